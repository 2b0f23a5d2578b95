"""Per-frame metrics of the SUN-SEG / VPS evaluation protocol, vectorised.

Every definition follows pysodmetrics 1.6.2 (which the SUN-SEG toolbox copies) bit for bit
where it matters:

* a prediction of another size is first resized as uint8 to the ground-truth size with
  ``cv2.resize(pred, (gt_w, gt_h))`` (bilinear, as the toolbox's evaluator does before any
  metric); then it is ``uint8 / 255``, min-max normalised when it is not constant; ground truth
  is ``gt > 128``;
* E-phi and F-beta curves use the 8-bit bins ``uint8(pred * 255) >= t`` for ``t = 255..0``;
* Dice, IoU, Sensitivity and Specificity curves use the toolbox's float thresholds
  ``pred >= linspace(1, 0, 256)``, which differ from the 8-bit bins for some values
  (e.g. ``4 / 255``), and are all 0 at a threshold without a true positive;
* a frame without foreground still gets scores: S-alpha = ``1 - mean(pred)``, weighted F = 0,
  E-phi from the background term only, F-beta / Dice / IoU / Sen / Spe = 0 (no true positive).

One frame gives a :class:`FrameScores`: a scalar vector (:data:`SCALAR_NAMES`) and a curve
matrix (:data:`CURVE_NAMES` x 256 thresholds, from the strictest threshold to the loosest).
"""

from __future__ import annotations

from typing import NamedTuple

import cv2
import numpy as np
from scipy.ndimage import distance_transform_edt

EPS = np.spacing(1)  # MATLAB's eps, as the reference implementation uses
N_THRESHOLDS = 256
# The toolbox's thresholds for Dice/IoU/Sen/Spe, compared against the float prediction.
FLOAT_THRESHOLDS = np.linspace(1, 0, N_THRESHOLDS)
_FLOAT_THRESHOLDS_ASCENDING = FLOAT_THRESHOLDS[::-1].copy()

SCALAR_NAMES = ("Smeasure", "wFmeasure", "MAE", "adpEm", "adpFm", "Dice@0.5", "IoU@0.5")
CURVE_NAMES = ("Em", "Fm", "Sen", "Spe", "Dice", "IoU")

S_ALPHA = 0.5
F_BETA_SQUARED = 0.3
WF_BETA = 1.0


class FrameScores(NamedTuple):
    """Scores of one frame.

    scalars: float64 (len(SCALAR_NAMES),); curves: float64 (len(CURVE_NAMES), 256),
    column k is the k-th threshold (8-bit threshold 255 - k, or FLOAT_THRESHOLDS[k]).
    """

    scalars: np.ndarray
    curves: np.ndarray


def resize_to_gt(pred_u8: np.ndarray, gt_u8: np.ndarray) -> np.ndarray:
    """The uint8 prediction at the ground truth's size: ``cv2.resize(pred, (gt_w, gt_h))`` (bilinear on
    the 8-bit values, as the SUN-SEG/VPS toolbox does), or the prediction itself when sizes agree."""
    if pred_u8.shape == gt_u8.shape:
        return pred_u8
    return cv2.resize(pred_u8, (gt_u8.shape[1], gt_u8.shape[0]), interpolation=cv2.INTER_LINEAR)


def prepare_frame(pred_u8: np.ndarray, gt_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Turn raw 8-bit images into the arrays the metrics use.

    Args:
        pred_u8: uint8 (h', w') grey prediction, any size.
        gt_u8: uint8 (h, w) grey ground truth.

    Returns:
        pred: float64 (h, w) in [0, 1], min-max normalised unless constant.
        gt: bool (h, w), ``gt_u8 > 128``.
        prob: float64 (h, w), ``resize_to_gt(pred_u8) / 255`` before normalisation.
    """
    gt = gt_u8 > 128
    prob = resize_to_gt(pred_u8, gt_u8) / 255.0
    lo, hi = prob.min(), prob.max()
    pred = (prob - lo) / (hi - lo) if hi != lo else prob
    return pred, gt, prob


def mae(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean absolute error of a float (h, w) prediction against a bool (h, w) mask."""
    return float(np.mean(np.abs(pred - gt)))


def _object_similarity(values: np.ndarray) -> float:
    mean = values.mean()
    std = values.std(ddof=1) if values.size > 1 else 0.0
    return 2 * mean / (mean * mean + 1 + std + EPS)


def _ssim(pred: np.ndarray, gt: np.ndarray) -> float:
    """The S-measure's region SSIM of one quadrant (float pred, float 0/1 gt).

    An empty quadrant (the centroid on the last row or column) has weight 0: it scores 0 here,
    where the reference gives NaN and so a NaN S-measure for the whole frame.
    """
    n = pred.size
    if n == 0:
        return 0.0
    x, y = pred.mean(), gt.mean()
    dx, dy = pred - x, gt - y
    # elementwise sums, not np.dot: BLAS threads only add contention on these small arrays
    sigma_x = (dx * dx).sum() / (n - 1 + EPS)
    sigma_y = (dy * dy).sum() / (n - 1 + EPS)
    sigma_xy = (dx * dy).sum() / (n - 1 + EPS)
    alpha = 4 * x * y * sigma_xy
    beta = (x * x + y * y) * (sigma_x + sigma_y)
    if alpha != 0:
        return alpha / (beta + EPS)
    return 1.0 if beta == 0 else 0.0


def _region_similarity(pred: np.ndarray, gt: np.ndarray) -> float:
    h, w = gt.shape
    n_fg = np.count_nonzero(gt)
    # centroid from row/column sums: the same exact integer sums as argwhere(gt).mean(axis=0)
    cy = np.round((np.arange(h) * np.count_nonzero(gt, axis=1)).sum() / n_fg)
    cx = np.round((np.arange(w) * np.count_nonzero(gt, axis=0)).sum() / n_fg)
    cy, cx = int(cy) + 1, int(cx) + 1  # MATLAB's 1:X includes X
    area = h * w
    w_lt = cx * cy / area
    w_rt = cy * (w - cx) / area
    w_lb = (h - cy) * cx / area
    w_rb = 1 - w_lt - w_rt - w_lb
    gt_f = gt.astype(np.float64)
    return (
        _ssim(pred[:cy, :cx], gt_f[:cy, :cx]) * w_lt
        + _ssim(pred[:cy, cx:], gt_f[:cy, cx:]) * w_rt
        + _ssim(pred[cy:, :cx], gt_f[cy:, :cx]) * w_lb
        + _ssim(pred[cy:, cx:], gt_f[cy:, cx:]) * w_rb
    )


def s_measure(pred: np.ndarray, gt: np.ndarray, alpha: float = S_ALPHA) -> float:
    """Structure measure (Fan et al. 2017) of a float (h, w) prediction and bool (h, w) mask."""
    fg_ratio = np.count_nonzero(gt) / gt.size
    if fg_ratio == 0:
        return float(1 - pred.mean())
    if fg_ratio == 1:
        return float(pred.mean())
    object_score = (
        _object_similarity(pred[gt]) * fg_ratio + _object_similarity(1 - pred[~gt]) * (1 - fg_ratio)
    )
    score = alpha * object_score + (1 - alpha) * _region_similarity(pred, gt)
    return float(max(0.0, score))


def _gaussian_1d(size: int = 7, sigma: float = 5.0) -> np.ndarray:
    # fspecial('gaussian', 7, 5) is the outer product of this normalised 1-D kernel
    r = (size - 1) / 2
    x = np.arange(-r, r + 1)
    g = np.exp(-(x * x) / (2 * sigma * sigma))
    return g / g.sum()


_GAUSS_7_5 = _gaussian_1d()


def _nearest_foreground(gt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row and column (int (h, w) each) of every pixel's nearest foreground pixel and the distance.

    The indices are scipy's (MATLAB bwdist's tie-breaking matters for exact agreement); the
    distance is computed from them in integers, cheaper than scipy's float path.
    """
    iy, ix = distance_transform_edt(~gt, return_distances=False, return_indices=True)
    h, w = gt.shape
    dy = iy - np.arange(h, dtype=iy.dtype)[:, None]
    dx = ix - np.arange(w, dtype=ix.dtype)[None, :]
    return iy, ix, np.sqrt(dy * dy + dx * dx)


def weighted_f_measure(pred: np.ndarray, gt: np.ndarray, beta: float = WF_BETA) -> float:
    """Weighted F-measure (Margolin et al. 2014); 0 for a frame without foreground."""
    if not gt.any():
        return 0.0
    iy, ix, dist = _nearest_foreground(gt)
    err = np.abs(pred - gt)
    err_at_edge = err[iy, ix]  # background pixels take the error of their nearest foreground pixel
    err_smooth = cv2.sepFilter2D(err_at_edge, -1, _GAUSS_7_5, _GAUSS_7_5, borderType=cv2.BORDER_CONSTANT)
    min_err = np.where(gt & (err_smooth < err), err_smooth, err)
    importance = np.where(gt, 1.0, 2 - np.exp(np.log(0.5) / 5 * dist))
    weighted_err = min_err * importance
    err_fg = weighted_err[gt]
    tp_w = err_fg.size - err_fg.sum()
    fp_w = weighted_err.sum() - err_fg.sum()
    recall = 1 - err_fg.mean()
    precision = tp_w / (tp_w + fp_w + EPS)
    return float((1 + beta) * recall * precision / (recall + beta * precision + EPS))


def _enhanced_alignment(tp, fp, n_fg: int, size: int):
    """E-phi from confusion counts; tp, fp: scalars or int arrays (one entry per threshold)."""
    tp = np.asarray(tp, dtype=np.float64)
    fp = np.asarray(fp, dtype=np.float64)
    pred_fg = tp + fp
    pred_bg = size - pred_fg
    if n_fg == 0:
        total = pred_bg
    elif n_fg == size:
        total = pred_fg
    else:
        fn = n_fg - tp
        tn = pred_bg - fn
        mean_pred = pred_fg / size
        mean_gt = n_fg / size
        total = np.zeros_like(tp)
        for count, pred_value, gt_value in (
            (tp, 1 - mean_pred, 1 - mean_gt),
            (fp, 1 - mean_pred, -mean_gt),
            (fn, -mean_pred, 1 - mean_gt),
            (tn, -mean_pred, -mean_gt),
        ):
            align = 2 * (pred_value * gt_value) / (pred_value**2 + gt_value**2 + EPS)
            total = total + (align + 1) ** 2 / 4 * count
    return total / (size - 1 + EPS)


def _f_beta(tp, fp, n_fg: int, beta2: float = F_BETA_SQUARED):
    """F-beta from confusion counts (arrays or scalars); 0 where there is no true positive."""
    tp = np.asarray(tp, dtype=np.float64)
    predicted = tp + fp
    precision = tp / np.where(predicted == 0, 1, predicted)
    recall = tp / max(n_fg, 1)
    numerator = (1 + beta2) * precision * recall
    denominator = np.where(numerator == 0, 1, beta2 * precision + recall)
    return numerator / denominator


def _toolbox_rates(tp, fp, n_fg: int, size: int) -> np.ndarray:
    """Sen, Spe, Dice, IoU rows (4, T) from counts; all 0 where tp == 0 (the toolbox's rule)."""
    tp = np.asarray(tp, dtype=np.float64)
    fp = np.asarray(fp, dtype=np.float64)
    fn = n_fg - tp
    tn = (size - n_fg) - fp
    has_tp = tp > 0
    # Spe's tn + fp is 0 on an all-foreground frame: 0/0 is 0 there (the toolbox would give NaN)
    bg = np.asarray(tn + fp, dtype=np.float64)
    spe = np.divide(tn, bg, out=np.zeros_like(bg), where=bg > 0)
    safe = np.where(has_tp, 1.0, 0.0)  # only read where tp > 0, where every other denominator is > 0
    denominators = np.maximum(np.stack([np.full_like(tp, n_fg), n_fg + tp + fp, fn + tp + fp]), 1)
    sen, dice, iou = np.stack([tp, 2 * tp, tp]) / denominators
    return np.stack([sen, spe, dice, iou]) * safe


def _cumulative_counts(bin_index: np.ndarray, gt: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """True/false positive counts per threshold from one histogram pass.

    bin_index: int (h, w), the first threshold index at which the pixel is predicted positive.
    Returns tp, fp: int64 (n_bins,), positives among gt foreground/background at each threshold.
    """
    hist = np.bincount((bin_index + n_bins * gt).ravel(), minlength=2 * n_bins).reshape(2, n_bins)
    return np.cumsum(hist[1]), np.cumsum(hist[0])


def _float_threshold_start(pred: np.ndarray) -> np.ndarray:
    """Index k of the first toolbox threshold with ``pred >= FLOAT_THRESHOLDS[k]``, int (h, w)."""
    passed = np.searchsorted(_FLOAT_THRESHOLDS_ASCENDING, pred, side="right")
    return N_THRESHOLDS - passed


def binary_dice_iou(prob: np.ndarray, gt: np.ndarray, threshold: float = 0.5) -> tuple[float, float]:
    """Dice and IoU of ``prob >= threshold`` (un-normalised probability); 0 when both are empty."""
    binary = prob >= threshold
    tp = np.count_nonzero(binary & gt)
    n_pred, n_fg = np.count_nonzero(binary), np.count_nonzero(gt)
    union = n_pred + n_fg - tp
    dice = 2 * tp / (n_pred + n_fg) if n_pred + n_fg else 0.0
    iou = tp / union if union else 0.0
    return float(dice), float(iou)


def score_prepared(pred: np.ndarray, gt: np.ndarray, prob: np.ndarray | None = None) -> FrameScores:
    """All metrics of one frame from prepared arrays (see :func:`prepare_frame`).

    pred: float64 (h, w) in [0, 1]; gt: bool (h, w); prob: float64 (h, w) for Dice@0.5 (default pred).
    """
    if prob is None:
        prob = pred
    size, n_fg = gt.size, int(np.count_nonzero(gt))

    # 8-bit bins, strictest first: bin k holds uint8 value 255 - k
    byte_start = 255 - (pred * 255).astype(np.uint8).astype(np.intp)
    tp8, fp8 = _cumulative_counts(byte_start, gt, N_THRESHOLDS)
    tpf, fpf = _cumulative_counts(_float_threshold_start(pred), gt, N_THRESHOLDS + 1)

    adaptive = pred >= min(2 * pred.mean(), 1)
    tp_a = np.count_nonzero(adaptive & gt)
    fp_a = np.count_nonzero(adaptive) - tp_a

    dice05, iou05 = binary_dice_iou(prob, gt)
    scalars = np.array(
        [
            s_measure(pred, gt),
            weighted_f_measure(pred, gt),
            mae(pred, gt),
            float(_enhanced_alignment(tp_a, fp_a, n_fg, size)),
            float(_f_beta(tp_a, fp_a, n_fg)),
            dice05,
            iou05,
        ]
    )
    curves = np.vstack(
        [
            _enhanced_alignment(tp8, fp8, n_fg, size),
            _f_beta(tp8, fp8, n_fg),
            _toolbox_rates(tpf[:N_THRESHOLDS], fpf[:N_THRESHOLDS], n_fg, size),
        ]
    )
    return FrameScores(scalars, curves)


def score_frame(pred_u8: np.ndarray, gt_u8: np.ndarray) -> FrameScores:
    """All metrics of one frame from raw uint8 grey images.

    A prediction of another size is resized as uint8 first (:func:`resize_to_gt`), so it still holds
    256 levels and every frame takes the fast path (:func:`score_levels`).
    """
    return score_levels(resize_to_gt(pred_u8, gt_u8), gt_u8 > 128)


# ---------------------------------------------------------------------------------------------
# Fast path. A same-size prediction holds at most 256 grey levels, so every metric but the
# weighted F-measure follows from one joint histogram (S-measure quadrant x gt x level): the
# per-pixel work is one bincount, and the min-max normalisation is a 256-entry lookup table
# computed with the same float expression as the per-pixel path.
# ---------------------------------------------------------------------------------------------

_RAW_PROB = np.arange(256) / 255.0
_BINARY_AT_HALF = _RAW_PROB >= 0.5
_WF_BAND = 3  # the 7x7 Gaussian reaches 3 px: only background within 3 px of the foreground matters


def _level_table(present: np.ndarray) -> np.ndarray:
    """Normalised prediction value of each raw level, float64 (256,), given which levels occur."""
    levels = _RAW_PROB[present]
    lo, hi = levels.min(), levels.max()
    return (_RAW_PROB - lo) / (hi - lo) if hi != lo else _RAW_PROB.copy()


def _quadrant_codes(gt: np.ndarray) -> tuple[np.ndarray | int, tuple[int, int]]:
    """512 x the S-measure quadrant of every pixel (0 lt, 1 rt, 2 lb, 3 rb), uint16 (h, w), and
    the split point (cy, cx) at the foreground centroid; (0, (0, 0)) without fg or bg."""
    h, w = gt.shape
    n_fg = np.count_nonzero(gt)
    if n_fg == 0 or n_fg == gt.size:
        return 0, (0, 0)
    cy = int(np.round((np.arange(h) * np.count_nonzero(gt, axis=1)).sum() / n_fg)) + 1
    cx = int(np.round((np.arange(w) * np.count_nonzero(gt, axis=0)).sum() / n_fg)) + 1
    codes = np.zeros((h, w), np.uint16)
    codes[:, cx:] = 512
    codes[cy:] += 1024
    return codes, (cy, cx)


def _weighted_std(values: np.ndarray, counts: np.ndarray, mean: float) -> float:
    n = counts.sum()
    return np.sqrt((counts * (values - mean) ** 2).sum() / (n - 1)) if n > 1 else 0.0


def _object_similarity_hist(values: np.ndarray, counts: np.ndarray) -> float:
    mean = (counts * values).sum() / counts.sum()
    return 2 * mean / (mean * mean + 1 + _weighted_std(values, counts, mean) + EPS)


def _ssim_hist(table: np.ndarray, hist: np.ndarray) -> float:
    """Region SSIM of a quadrant from its (2 gt, 256 level) histogram; empty quadrant -> 0."""
    n = hist.sum()
    if n == 0:
        return 0.0
    x = (hist * table).sum() / n
    y = hist[1].sum() / n
    dx = table - x
    dy = np.array([-y, 1 - y])[:, None]
    sigma_x = (hist * dx * dx).sum() / (n - 1 + EPS)
    sigma_y = (hist * dy * dy).sum() / (n - 1 + EPS)
    sigma_xy = (hist * dx * dy).sum() / (n - 1 + EPS)
    alpha = 4 * x * y * sigma_xy
    beta = (x * x + y * y) * (sigma_x + sigma_y)
    if alpha != 0:
        return alpha / (beta + EPS)
    return 1.0 if beta == 0 else 0.0


def _ssim_constant_block(value: float, shape: tuple[int, int], block: tuple[slice, slice]) -> float:
    """Region SSIM of a quadrant where prediction and gt are both constant.

    Exactly 0/0 in theory; the reference scores 1 when its float mean of the block equals the value
    and 0 when rounding leaves a residue, so replay that mean on a same-layout array.
    """
    return 1.0 if np.full(shape, value)[block].mean() == value else 0.0


def _s_measure_hist(table, hist, shape, centroid, alpha: float = S_ALPHA) -> float:
    """S-measure from the (4 quadrants, 2 gt, 256 level) histogram."""
    both = hist.sum(axis=0)
    size = both.sum()
    fg_ratio = both[1].sum() / size
    if fg_ratio == 0 or fg_ratio == 1:
        mean = (both.sum(axis=0) * table).sum() / size
        return float(1 - mean if fg_ratio == 0 else mean)
    object_score = _object_similarity_hist(table, both[1]) * fg_ratio + _object_similarity_hist(
        1 - table, both[0]
    ) * (1 - fg_ratio)
    (h, w), (cy, cx) = shape, centroid
    w_lt, w_rt, w_lb = cx * cy / size, cy * (w - cx) / size, (h - cy) * cx / size
    weights = (w_lt, w_rt, w_lb, 1 - w_lt - w_rt - w_lb)
    blocks = (
        (slice(0, cy), slice(0, cx)),
        (slice(0, cy), slice(cx, w)),
        (slice(cy, h), slice(0, cx)),
        (slice(cy, h), slice(cx, w)),
    )
    region = 0.0
    for q in range(4):
        occupied = np.flatnonzero(hist[q])
        if occupied.size == 1:
            score = _ssim_constant_block(table[occupied[0] % 256], shape, blocks[q])
        else:
            score = _ssim_hist(table, hist[q])
        region += score * weights[q]
    return float(max(0.0, alpha * object_score + (1 - alpha) * region))


def _background_distances(gt: np.ndarray) -> np.ndarray:
    """Euclidean distance of every pixel to the nearest foreground pixel, float64 (h, w).

    OpenCV's exact (float32) transform, turned back into sqrt(integer squared distance) in float64:
    the same numbers as scipy's, several times faster. Huge images fall back to scipy.
    """
    h, w = gt.shape
    if h * h + w * w >= 4_000_000:  # beyond this float32 no longer pins the integer square
        return distance_transform_edt(~gt)
    dist32 = cv2.distanceTransform((~gt).view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return np.sqrt(np.rint(dist32.astype(np.float64) ** 2))


def _bounding_box(mask: np.ndarray, grow: int = 0) -> tuple[slice, slice]:
    """Slices of the box around a non-empty bool (h, w) mask, grown by ``grow`` px within the image."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    h, w = mask.shape
    return (
        slice(max(rows[0] - grow, 0), min(rows[-1] + grow + 1, h)),
        slice(max(cols[0] - grow, 0), min(cols[-1] + grow + 1, w)),
    )


def _weighted_f_measure_fast(err: np.ndarray, gt: np.ndarray, beta: float = WF_BETA) -> float:
    """Weighted F-measure from the per-pixel error ``|pred - gt|`` (float64 (h, w)), bool gt.

    Background pixels weigh their own error by the distance term; the Gaussian-smoothed error is
    only read on the foreground, so it is computed in the foreground's box grown by 3 px.
    """
    if not gt.any():
        return 0.0
    # background pixels without error add nothing: the distances are only needed in the box around
    # the foreground and the erring pixels, and are exact there (every foreground pixel is inside)
    active = _bounding_box((err != 0) | gt)
    gt_active, err_active = gt[active], err[active]
    bg = ~gt_active
    importance = 2 - np.exp(np.log(0.5) / 5 * _background_distances(gt_active)[bg])
    fp_w = (err_active[bg] * importance).sum()
    box = _bounding_box(gt, grow=_WF_BAND)
    gt_box, err_box = gt[box], err[box]
    iy, ix = distance_transform_edt(~gt_box, return_distances=False, return_indices=True)
    err_smooth = cv2.sepFilter2D(err_box[iy, ix], -1, _GAUSS_7_5, _GAUSS_7_5, borderType=cv2.BORDER_CONSTANT)
    err_fg, smooth_fg = err_box[gt_box], err_smooth[gt_box]
    err_fg = np.where(smooth_fg < err_fg, smooth_fg, err_fg)
    tp_w = err_fg.size - err_fg.sum()
    recall = 1 - err_fg.mean()
    precision = tp_w / (tp_w + fp_w + EPS)
    return float((1 + beta) * recall * precision / (recall + beta * precision + EPS))


def _level_counts(start_of_level: np.ndarray, counts: np.ndarray, n_bins: int) -> np.ndarray:
    """Positives per threshold: cumulative counts of levels by their first positive threshold."""
    return np.cumsum(np.bincount(start_of_level, weights=counts, minlength=n_bins)[:N_THRESHOLDS])


def score_levels(pred_u8: np.ndarray, gt: np.ndarray) -> FrameScores:
    """All metrics of one frame: uint8 (h, w) prediction, bool (h, w) gt of the same size.

    Same numbers as :func:`score_prepared` on :func:`prepare_frame`'s arrays (up to float summation order).
    """
    size, n_fg = gt.size, int(np.count_nonzero(gt))
    codes, centroid = _quadrant_codes(gt)
    index = pred_u8.astype(np.uint16)
    index |= gt.view(np.uint8).astype(np.uint16) << 8
    index |= codes
    # cv2.calcHist counts uint16 codes ~10x faster than np.bincount (float32 counts: exact below 2**24)
    hist = cv2.calcHist([index], [0], None, [2048], [0, 2048]).reshape(4, 2, 256).astype(np.float64)
    both = hist.sum(axis=0)  # (2 gt, 256 level)
    per_level = both.sum(axis=0)
    table = _level_table(per_level > 0)

    mean_pred = (per_level * table).sum() / size
    mae_value = ((both[0] * table).sum() + (both[1] * (1 - table)).sum()) / size
    adaptive = table >= min(2 * mean_pred, 1)
    tp_a, fp_a = both[1][adaptive].sum(), both[0][adaptive].sum()
    tp05, pred05 = both[1][_BINARY_AT_HALF].sum(), per_level[_BINARY_AT_HALF].sum()
    dice05 = 2 * tp05 / (pred05 + n_fg) if pred05 + n_fg else 0.0
    iou05 = tp05 / (pred05 + n_fg - tp05) if pred05 + n_fg - tp05 else 0.0

    byte_start = 255 - (table * 255).astype(np.uint8).astype(np.intp)
    tp8, fp8 = (_level_counts(byte_start, both[g], N_THRESHOLDS) for g in (1, 0))
    float_start = _float_threshold_start(table)
    tpf, fpf = (_level_counts(float_start, both[g], N_THRESHOLDS + 1) for g in (1, 0))

    err_table = np.tile(np.concatenate([table, 1 - table]), 4)  # indexed by the histogram codes
    err = err_table[index]
    scalars = np.array(
        [
            _s_measure_hist(table, hist, gt.shape, centroid),
            _weighted_f_measure_fast(err, gt),
            mae_value,
            float(_enhanced_alignment(tp_a, fp_a, n_fg, size)),
            float(_f_beta(tp_a, fp_a, n_fg)),
            dice05,
            iou05,
        ]
    )
    curves = np.vstack(
        [
            _enhanced_alignment(tp8, fp8, n_fg, size),
            _f_beta(tp8, fp8, n_fg),
            _toolbox_rates(tpf, fpf, n_fg, size),
        ]
    )
    return FrameScores(scalars, curves)


def summarize_curves(scalars: np.ndarray, curves: np.ndarray) -> dict[str, float]:
    """Toolbox keys from averaged scores: scalars (len(SCALAR_NAMES),), curves (len(CURVE_NAMES), 256).

    Returns Smeasure, wFmeasure, MAE, adpEm, meanEm, maxEm, adpFm, meanFm, maxFm, meanSen, maxSen,
    meanSpe, maxSpe, meanDice, maxDice, meanIoU, maxIoU, Dice@0.5, IoU@0.5.
    """
    s = dict(zip(SCALAR_NAMES, scalars.tolist()))
    c = dict(zip(CURVE_NAMES, curves))
    out = {"Smeasure": s["Smeasure"], "wFmeasure": s["wFmeasure"], "MAE": s["MAE"]}
    for name in ("Em", "Fm"):
        out[f"adp{name}"] = s[f"adp{name}"]
        out[f"mean{name}"] = float(c[name].mean())
        out[f"max{name}"] = float(c[name].max())
    for name, key in (("Sen", "Sen"), ("Spe", "Spe"), ("Dice", "Dice"), ("IoU", "IoU")):
        out[f"mean{key}"] = float(c[name].mean())
        out[f"max{key}"] = float(c[name].max())
    out["Dice@0.5"] = s["Dice@0.5"]
    out["IoU@0.5"] = s["IoU@0.5"]
    return out


SUMMARY_KEYS = tuple(summarize_curves(np.zeros(len(SCALAR_NAMES)), np.zeros((len(CURVE_NAMES), 2))))
PAPER_COLUMNS = ("Smeasure", "meanEm", "wFmeasure", "meanFm", "maxDice", "meanSen")
