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
