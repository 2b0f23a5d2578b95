"""Per-frame metrics of eval.metrics against pysodmetrics, the toolbox's own loop and hand-computed cases."""

import warnings

import cv2
import numpy as np
import pytest

from eval.metrics import (
    CURVE_NAMES,
    FLOAT_THRESHOLDS,
    SCALAR_NAMES,
    SUMMARY_KEYS,
    binary_dice_iou,
    prepare_frame,
    score_frame,
    score_prepared,
    summarize_curves,
)

psm = pytest.importorskip("py_sod_metrics")

TOL = 1e-6


def pysod_reference(pred_u8, gt_u8, normalize=True):
    """pysodmetrics' per-frame values: scalars dict, curves dict (Em, Fm: 256 thresholds 255..0)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Fmeasure's deprecation notice
        metrics = dict(sm=psm.Smeasure(), wfm=psm.WeightedFmeasure(), mae=psm.MAE(), em=psm.Emeasure(), fm=psm.Fmeasure())
    for metric in metrics.values():
        metric.step(pred_u8, gt_u8, normalize=normalize)
    em, fm = metrics["em"].get_results()["em"], metrics["fm"].get_results()["fm"]
    scalars = {
        "Smeasure": metrics["sm"].get_results()["sm"],
        "wFmeasure": metrics["wfm"].get_results()["wfm"],
        "MAE": metrics["mae"].get_results()["mae"],
        "adpEm": em["adp"],
        "adpFm": fm["adp"],
    }
    return scalars, {"Em": em["curve"], "Fm": fm["curve"]}


def toolbox_rates_loop(pred, gt):
    """The SUN-SEG toolbox's threshold loop, literally: Sen, Spe, Dice, IoU (4, 256)."""
    out = np.zeros((4, 256))
    n_obj = gt.sum()
    for k, threshold in enumerate(FLOAT_THRESHOLDS):
        label = pred >= threshold
        n_rec, n_no_rec = label.sum(), (~label).sum()
        n_and = (label & gt).sum()
        fn, fp = n_obj - n_and, n_rec - n_and
        tn = n_no_rec - fn
        if n_and == 0:
            continue
        spe = tn / (tn + fp) if tn + fp else 0.0
        out[:, k] = [n_and / n_obj, spe, 2 * n_and / (n_obj + n_rec), n_and / (fn + n_rec)]
    return out


def assert_matches_pysod(pred_u8, gt_u8):
    scores = score_frame(pred_u8, gt_u8)
    ref_scalars, ref_curves = pysod_reference(pred_u8, gt_u8)
    for name, value in ref_scalars.items():
        assert scores.scalars[SCALAR_NAMES.index(name)] == pytest.approx(value, abs=TOL), name
    for name, curve in ref_curves.items():
        np.testing.assert_allclose(scores.curves[CURVE_NAMES.index(name)], curve, atol=TOL, err_msg=name)
    pred, gt, _ = prepare_frame(pred_u8, gt_u8)
    np.testing.assert_allclose(scores.curves[2:], toolbox_rates_loop(pred, gt), atol=TOL)


def random_frame(rng, shape, fg_fraction):
    pred = rng.integers(0, 256, shape, dtype=np.uint8)
    gt = ((rng.random(shape) < fg_fraction) * 255).astype(np.uint8)
    return pred, gt


@pytest.mark.parametrize("seed", range(12))
def test_random_frames_match_pysodmetrics(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(3, 90, 2))
    assert_matches_pysod(*random_frame(rng, shape, rng.uniform(0.05, 0.9)))


def ellipse(shape, centre, axes, value=255):
    image = np.zeros(shape, np.uint8)
    cv2.ellipse(image, centre, axes, 0, 0, 360, value, -1)
    return image


@pytest.mark.parametrize(
    "centre_shift, blur, scale",
    [(0, 0, 1.0), (5, 3, 1.0), (12, 6, 0.8), (30, 2, 0.5), (-8, 9, 1.0)],
)
def test_synthetic_shapes_match_pysodmetrics(centre_shift, blur, scale):
    shape = (96, 128)
    gt = ellipse(shape, (60, 48), (30, 20))
    pred = ellipse(shape, (60 + centre_shift, 48 + centre_shift // 2), (28, 22)).astype(np.float32)
    if blur:
        pred = cv2.GaussianBlur(pred, (0, 0), blur)
    pred = np.clip(pred * scale, 0, 255).astype(np.uint8)
    assert_matches_pysod(pred, gt)


@pytest.mark.parametrize("gt_value", [0, 255])
def test_frames_without_foreground_or_background_match_pysodmetrics(gt_value):
    rng = np.random.default_rng(7)
    pred = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    assert_matches_pysod(pred, np.full((20, 30), gt_value, np.uint8))


def test_empty_ground_truth_has_defined_scores():
    pred = np.zeros((10, 10), np.uint8)
    pred[2:4, 2:4] = 255
    scores = score_frame(pred, np.zeros((10, 10), np.uint8))
    s = dict(zip(SCALAR_NAMES, scores.scalars))
    assert s["Smeasure"] == pytest.approx(1 - 4 / 100)
    assert s["wFmeasure"] == 0.0
    assert s["Dice@0.5"] == 0.0
    assert not np.any(scores.curves[1:])  # F-beta, Sen, Spe, Dice, IoU: no true positive anywhere
    assert np.all(np.isfinite(scores.curves))


def test_constant_prediction_is_not_normalised():
    pred = np.full((8, 8), 51, np.uint8)
    gt = np.zeros((8, 8), np.uint8)
    gt[:4] = 255
    normalised, _, _ = prepare_frame(pred, gt)
    np.testing.assert_allclose(normalised, 0.2)
    assert_matches_pysod(pred, gt)


def test_perfect_binary_prediction_hand_computed():
    gt = np.zeros((10, 10), np.uint8)
    gt[3:7, 3:7] = 255
    s = dict(zip(SCALAR_NAMES, score_frame(gt.copy(), gt).scalars))
    assert s["MAE"] == 0
    assert s["Smeasure"] == pytest.approx(1, abs=1e-9)
    assert s["Dice@0.5"] == s["IoU@0.5"] == 1
    summary = summarize_curves(*score_frame(gt.copy(), gt))
    assert summary["maxDice"] == summary["maxIoU"] == summary["maxSen"] == 1


def test_small_case_curves_hand_computed():
    # 1 x 4 frame: gt = [1, 1, 0, 0], pred = [255, 0, 255, 0] -> one TP and one FP at every threshold > 0
    gt = np.array([[255, 255, 0, 0]], np.uint8)
    pred = np.array([[255, 0, 255, 0]], np.uint8)
    scores = score_frame(pred, gt)
    c = dict(zip(CURVE_NAMES, scores.curves))
    s = dict(zip(SCALAR_NAMES, scores.scalars))
    assert s["MAE"] == pytest.approx(0.5)
    assert s["Dice@0.5"] == pytest.approx(0.5) and s["IoU@0.5"] == pytest.approx(1 / 3)
    np.testing.assert_allclose(c["Sen"][:255], 0.5)
    np.testing.assert_allclose(c["Spe"][:255], 0.5)
    np.testing.assert_allclose(c["Dice"][:255], 0.5)
    np.testing.assert_allclose(c["IoU"][:255], 1 / 3)
    # threshold 0: everything positive -> Sen 1, Spe 0, Dice 2*2/(2+4), IoU 2/4
    np.testing.assert_allclose([c["Sen"][255], c["Spe"][255], c["Dice"][255], c["IoU"][255]], [1, 0, 2 / 3, 0.5])
    np.testing.assert_allclose(c["Fm"][:255], 1.3 * 0.5 * 0.5 / (0.3 * 0.5 + 0.5))


def test_float_thresholds_differ_from_eight_bit_bins_like_the_toolbox():
    # pred = 4/255 is below linspace(1, 0, 256)[251] in floating point: the toolbox does not count it there
    gt = np.array([[255, 0]], np.uint8)
    pred = np.array([[4, 255]], np.uint8)  # min-max keeps 4/255 (min 0 is absent: min is 4) -> use prepared arrays
    p = np.array([[4 / 255, 1.0]])
    g = np.array([[True, False]])
    scores = score_prepared(p, g)
    np.testing.assert_allclose(scores.curves[2:], toolbox_rates_loop(p, g), atol=0)
    assert scores.curves[CURVE_NAMES.index("Sen"), 251] == 0  # float threshold 4/255 not reached
    assert score_frame(pred, gt).curves.shape == (len(CURVE_NAMES), 256)


@pytest.mark.parametrize("pred_shape, gt_shape", [((20, 30), (40, 60)), ((47, 47), (57, 50)), ((64, 48), (30, 33))])
def test_resized_prediction_is_resized_as_uint8_like_the_toolbox(pred_shape, gt_shape):
    # the toolbox: cv2.resize(uint8 pred, (gt_w, gt_h)) (bilinear), then /255 and min-max
    rng = np.random.default_rng(sum(pred_shape + gt_shape))
    gt = ((rng.random(gt_shape) < 0.3) * 255).astype(np.uint8)
    pred = cv2.GaussianBlur(rng.integers(0, 256, pred_shape, dtype=np.uint8), (0, 0), 1.5)
    resized = cv2.resize(pred, (gt_shape[1], gt_shape[0]))
    assert resized.dtype == np.uint8
    normalised, _, raw = prepare_frame(pred, gt)
    np.testing.assert_array_equal(raw, resized / 255)
    np.testing.assert_allclose(normalised, (resized - resized.min()) / (resized.max() - resized.min()), atol=1e-15)
    scores = score_frame(pred, gt)
    ref_scalars, ref_curves = pysod_reference(resized, gt)
    for name, value in ref_scalars.items():
        assert scores.scalars[SCALAR_NAMES.index(name)] == pytest.approx(value, abs=TOL), name
    for name, curve in ref_curves.items():
        np.testing.assert_allclose(scores.curves[CURVE_NAMES.index(name)], curve, atol=TOL, err_msg=name)
    ref_pred, ref_gt = psm.utils.prepare_data(resized, gt)
    np.testing.assert_allclose(scores.curves[2:], toolbox_rates_loop(ref_pred, ref_gt), atol=TOL)
    assert score_frame(resized, gt).scalars == pytest.approx(scores.scalars, abs=1e-12)


def test_binary_dice_iou_uses_raw_probability_at_half():
    gt = np.array([[True, True, False, False]])
    prob = np.array([[0.5, 0.49, 0.7, 0.0]])
    assert binary_dice_iou(prob, gt) == pytest.approx((0.5, 1 / 3))
    assert binary_dice_iou(np.zeros((2, 2)), np.zeros((2, 2), bool)) == (0.0, 0.0)


def test_summary_has_toolbox_keys():
    expected = {
        "Smeasure", "wFmeasure", "MAE", "adpEm", "meanEm", "maxEm", "adpFm", "meanFm", "maxFm", "meanSen",
        "maxSen", "meanSpe", "maxSpe", "meanDice", "maxDice", "meanIoU", "maxIoU", "Dice@0.5", "IoU@0.5",
    }  # fmt: skip
    assert set(SUMMARY_KEYS) == expected


@pytest.mark.parametrize("seed", range(4))
def test_small_objects_in_large_frames_match_pysodmetrics(seed):
    # the fast path crops the weighted F-measure to the object: check crops near borders too
    rng = np.random.default_rng(100 + seed)
    gt = np.zeros((120, 160), np.uint8)
    for _ in range(3):
        centre = (int(rng.integers(0, 160)), int(rng.integers(0, 120)))
        cv2.ellipse(gt, centre, (int(rng.integers(2, 15)), int(rng.integers(2, 15))), 0, 0, 360, 255, -1)
    pred = cv2.GaussianBlur(np.roll(gt, int(rng.integers(-6, 7)), axis=1).astype(np.float32), (0, 0), 3)
    pred = pred.astype(np.uint8)
    pred[rng.random(pred.shape) < 0.01] = 90  # scattered false positives far from the objects
    assert_matches_pysod(pred, gt)


def test_centroid_on_last_column_scores_empty_quadrants_as_zero():
    gt = np.zeros((6, 6), np.uint8)
    gt[:, 5] = 255
    pred = np.zeros((6, 6), np.uint8)
    pred[:, 4:] = 255
    fast = score_frame(pred, gt)
    slow = score_prepared(*prepare_frame(pred, gt))
    assert np.isfinite(fast.scalars).all()
    np.testing.assert_allclose(fast.scalars, slow.scalars, atol=TOL)


@pytest.mark.parametrize("seed", range(3))
def test_fast_path_equals_per_pixel_path(seed):
    rng = np.random.default_rng(seed)
    pred, gt = random_frame(rng, (50, 70), 0.3)
    fast = score_frame(pred, gt)
    slow = score_prepared(*prepare_frame(pred, gt))
    np.testing.assert_allclose(fast.scalars, slow.scalars, atol=1e-12)
    np.testing.assert_allclose(fast.curves, slow.curves, atol=1e-12)


# ---- the fast path: level histogram, active box, scipy's nearest foreground pixel, batches ----------


def toolbox_byte_loop(pred, gt):
    """F-beta curve over the 8-bit thresholds ``uint8(pred * 255) >= t``, t = 255..0, literally (pysodmetrics)."""
    byte = (pred * 255).astype(np.uint8)
    out = np.zeros(256)
    n_fg = gt.sum()
    for k, threshold in enumerate(range(255, -1, -1)):
        label = byte >= threshold
        tp, n_pred = (label & gt).sum(), label.sum()
        if tp:
            precision, recall = tp / n_pred, tp / n_fg
            out[k] = 1.3 * precision * recall / (0.3 * precision + recall)
    return out


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("levels", [(0, 4, 255), (0, 1, 2, 3, 4, 5, 250, 255), (3, 4, 7, 200), (17, 4, 9), (0, 128, 127, 255)])
def test_level_histogram_equals_per_threshold_loops(seed, levels):
    # few grey levels (many ties), 4/255 below linspace(1, 0, 256)[251], minimum 0 (kept as k/255) or not (normalised)
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(4, 40, 2))
    pred = rng.choice(np.array(levels, np.uint8), shape)
    gt = ((rng.random(shape) < rng.uniform(0.1, 0.7)) * 255).astype(np.uint8)
    scores = score_frame(pred, gt)
    normalised, mask, _ = prepare_frame(pred, gt)
    np.testing.assert_allclose(scores.curves[2:], toolbox_rates_loop(normalised, mask), atol=1e-12)
    np.testing.assert_allclose(scores.curves[CURVE_NAMES.index("Fm")], toolbox_byte_loop(normalised, mask), atol=1e-12)
    assert_matches_pysod(pred, gt)


def sparse_frame(rng, shape=(70, 90)):
    """An object, a soft prediction that is 0 away from it (a small active box), sometimes at a border."""
    gt = np.zeros(shape, np.uint8)
    centre = (int(rng.integers(-5, shape[1] + 5)), int(rng.integers(-5, shape[0] + 5)))
    cv2.ellipse(gt, centre, (int(rng.integers(1, 20)), int(rng.integers(1, 15))), 0, 0, 360, 255, -1)
    shift = int(rng.integers(-6, 7))
    pred = cv2.GaussianBlur(np.roll(gt, shift, axis=1).astype(np.float32), (0, 0), float(rng.uniform(0.5, 4)))
    pred = (pred * rng.uniform(0.3, 1.0)).astype(np.uint8)
    if rng.random() < 0.3:
        pred[rng.random(shape) < 0.002] = 60  # a few far false positives
    return pred, gt


@pytest.mark.parametrize("seed", range(10))
def test_sparse_predictions_match_pysodmetrics_and_per_pixel_path(seed):
    # pixels outside the box around the object and the nonzero prediction are counted, not visited
    pred, gt = sparse_frame(np.random.default_rng(200 + seed))
    assert_matches_pysod(pred, gt)
    fast = score_frame(pred, gt)
    slow = score_prepared(*prepare_frame(pred, gt))
    np.testing.assert_allclose(fast.scalars, slow.scalars, atol=1e-12)
    np.testing.assert_allclose(fast.curves, slow.curves, atol=1e-12)


@pytest.mark.parametrize(
    "pred_value, gt_box",
    [(0, (slice(2, 6), slice(3, 9))), (90, (slice(2, 6), slice(3, 9))), (0, None), (90, None), (255, (slice(0, 12), slice(0, 16)))],
)
def test_constant_predictions_match_pysodmetrics(pred_value, gt_box):
    # a constant prediction is not normalised: constant 0 has no error, any other constant errs everywhere
    pred = np.full((12, 16), pred_value, np.uint8)
    gt = np.zeros((12, 16), np.uint8)
    if gt_box:
        gt[gt_box] = 255
    assert_matches_pysod(pred, gt)


def test_object_in_a_corner_leaves_quadrants_constant():
    # the quadrants away from the object hold only background at level 0: the S-measure's 0/0 case
    gt = np.zeros((40, 50), np.uint8)
    gt[:6, :7] = 255
    pred = np.zeros((40, 50), np.uint8)
    pred[1:7, 1:8] = 200
    assert_matches_pysod(pred, gt)


def test_band_nearest_foreground_is_scipys():
    from scipy.ndimage import distance_transform_edt

    from eval.metrics import _band_nearest, _foreground_distances

    rng = np.random.default_rng(3)
    for trial in range(60):
        shape = tuple(rng.integers(5, 50, 2))
        gt = rng.random(shape) < rng.uniform(0.01, 0.4)
        if trial % 2:  # rectangles: straight edges, many equidistant foreground pixels
            gt = np.zeros(shape, bool)
            for _ in range(3):
                y, x = rng.integers(0, shape[0]), rng.integers(0, shape[1])
                gt[y : y + rng.integers(1, 8), x : x + rng.integers(1, 8)] = True
        if not gt.any():
            continue
        rows, cols = distance_transform_edt(~gt, return_distances=False, return_indices=True)
        band, nearest = _band_nearest(gt, _foreground_distances(gt))
        np.testing.assert_array_equal(nearest, rows.ravel()[band] * shape[1] + cols.ravel()[band])
        within_three = cv2.dilate(gt.view(np.uint8), np.ones((7, 7), np.uint8)).astype(bool) & ~gt
        assert set(np.flatnonzero(within_three)) <= set(band)


def test_a_batch_of_frames_scores_as_single_frames():
    from eval.metrics import score_frames

    rng = np.random.default_rng(11)
    frames = [sparse_frame(rng) for _ in range(3)]
    frames += [random_frame(rng, (30, 20), 0.3), (np.zeros((9, 9), np.uint8), np.zeros((9, 9), np.uint8))]
    frames += [(rng.integers(0, 256, (8, 8), dtype=np.uint8), np.full((8, 8), 255, np.uint8))]
    scalars, curves = score_frames(frames)
    for k, (pred, gt) in enumerate(frames):
        single = score_frame(pred, gt)
        np.testing.assert_array_equal(scalars[k], single.scalars)
        np.testing.assert_array_equal(curves[k], single.curves)
