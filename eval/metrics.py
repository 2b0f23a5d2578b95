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
    from scipy.ndimage import distance_transform_edt  # imported here: the fast path does without scipy

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


def _enhanced_alignment(tp, fp, n_fg, size):
    """E-phi from confusion counts: tp, fp arrays (one entry per threshold) or scalars; n_fg, size
    scalars or arrays broadcasting against them (e.g. (F, 1) for (F, T) counts)."""
    tp = np.asarray(tp, dtype=np.float64)
    fp = np.asarray(fp, dtype=np.float64)
    n_fg = np.asarray(n_fg, dtype=np.float64)
    pred_fg = tp + fp
    pred_bg = size - pred_fg
    fn = n_fg - tp
    tn = pred_bg - fn
    mean_pred = pred_fg / size
    mean_gt = n_fg / size
    total = np.zeros(np.broadcast(tp, n_fg).shape)
    for count, pred_value, gt_value in (
        (tp, 1 - mean_pred, 1 - mean_gt),
        (fp, 1 - mean_pred, -mean_gt),
        (fn, -mean_pred, 1 - mean_gt),
        (tn, -mean_pred, -mean_gt),
    ):
        align = 2 * (pred_value * gt_value) / (pred_value**2 + gt_value**2 + EPS)
        total = total + (align + 1) ** 2 / 4 * count
    # without foreground (background) the reference counts the predicted background (foreground)
    total = np.where(n_fg == 0, pred_bg, np.where(n_fg == size, pred_fg, total))
    return total / (size - 1 + EPS)


def _f_beta(tp, fp, n_fg, beta2: float = F_BETA_SQUARED):
    """F-beta from confusion counts (arrays or scalars; n_fg broadcasts); 0 where there is no true positive."""
    tp = np.asarray(tp, dtype=np.float64)
    predicted = tp + fp
    precision = tp / np.where(predicted == 0, 1, predicted)
    recall = tp / np.maximum(n_fg, 1)
    numerator = (1 + beta2) * precision * recall
    denominator = np.where(numerator == 0, 1, beta2 * precision + recall)
    return numerator / denominator


def _toolbox_rates(tp, fp, n_fg, size) -> np.ndarray:
    """Sen, Spe, Dice, IoU (..., 4, T) from counts (..., T) (n_fg, size broadcast); all 0 where
    tp == 0 (the toolbox's rule)."""
    tp = np.asarray(tp, dtype=np.float64)
    fp = np.asarray(fp, dtype=np.float64)
    fn = n_fg - tp
    tn = (size - n_fg) - fp
    has_tp = tp > 0
    # Spe's tn + fp is 0 on an all-foreground frame: 0/0 is 0 there (the toolbox would give NaN)
    bg = np.asarray(tn + fp, dtype=np.float64)
    spe = np.divide(tn, bg, out=np.zeros_like(bg), where=bg > 0)
    safe = np.where(has_tp, 1.0, 0.0)  # only read where tp > 0, where every other denominator is > 0
    denominators = np.maximum(np.stack([np.broadcast_to(n_fg, tp.shape), n_fg + tp + fp, fn + tp + fp]), 1)
    sen, dice, iou = np.stack([tp, 2 * tp, tp]) / denominators
    return np.stack([sen, spe, dice, iou], axis=-2) * safe[..., None, :]


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
    """All metrics of one frame from raw uint8 grey images (see :func:`score_frames`)."""
    scalars, curves = score_frames([(pred_u8, gt_u8)])
    return FrameScores(scalars[0], curves[0])


def score_frames(frames) -> tuple[np.ndarray, np.ndarray]:
    """All metrics of several frames from raw uint8 grey images, (pred_u8, gt_u8) pairs.

    A prediction of another size is resized as uint8 first (:func:`resize_to_gt`), so it still
    holds 256 levels and every frame takes the fast path. The pixels of each frame are reduced to
    a histogram; the per-threshold arithmetic is done for all frames at once.
    Returns scalars float64 (F, len(SCALAR_NAMES)), curves float64 (F, len(CURVE_NAMES), 256).
    """
    return _scores_from_summaries([_summarize_pixels(resize_to_gt(pred, gt), gt > 128) for pred, gt in frames])


# ---------------------------------------------------------------------------------------------
# Fast path. A same-size prediction holds at most 256 grey levels, so every metric but the
# weighted F-measure follows from one joint histogram (S-measure quadrant x gt x level), and the
# min-max normalisation is a 256-entry lookup table computed with the same float expression as
# the per-pixel path: every pixel gets the very value the per-pixel path gives it, so the float
# thresholds of Dice & co. (e.g. 4/255 < linspace(1, 0, 256)[251]) see the same numbers.
# Pixel work is confined to the *active box* around the foreground (grown by 3 px) and every
# nonzero prediction pixel: outside it every pixel is background at level 0, counted, not visited.
# ---------------------------------------------------------------------------------------------

_RAW_PROB = np.arange(256) / 255.0
_BINARY_AT_HALF = _RAW_PROB >= 0.5
_WF_BAND = 3  # the 7x7 Gaussian reaches 3 px: only background within 3 px of the foreground matters


def _offsets_by_distance(limit: int) -> np.ndarray:
    """For each squared distance d2 <= limit, the offsets (dy, dx) at that distance in scipy's
    order of preference, int (limit + 1, 8, 2), padded by repeating the last (8: the most offsets
    one squared distance below 25 has).

    scipy's feature transform finds each column's nearest foreground row first (ties: the upper
    row) and then, along the row, the nearest of those candidates (ties: the left column): of the
    nearest foreground pixels it takes the leftmost, then the uppermost.
    """
    span = int(np.sqrt(limit))
    table = np.zeros((limit + 1, 8, 2), np.intp)
    for d2 in range(1, limit + 1):
        at_d2 = [(dy, dx) for dx in range(-span, span + 1) for dy in range(-span, span + 1) if dy * dy + dx * dx == d2]
        if at_d2:  # listed leftmost first, then uppermost
            table[d2] = at_d2 + at_d2[-1:] * (8 - len(at_d2))
    return table


_BAND_D2 = 2 * _WF_BAND * _WF_BAND  # a pixel within _WF_BAND px (Chebyshev) of the foreground is this close
_OFFSETS_BY_D2 = _offsets_by_distance(_BAND_D2)
_BAND_PAD = int(np.sqrt(_BAND_D2))
_SLOTS = np.arange(_OFFSETS_BY_D2.shape[1])


Box = tuple[slice, slice]


class _PixelSummary(NamedTuple):
    """What the pixels of one frame give: the (4 quadrants, 2 gt, 256 levels) float64 histogram,
    the level -> normalised value table (256,), the S-measure split (cy, cx), the frame shape and
    the weighted F-measure."""

    hist: np.ndarray
    table: np.ndarray
    split: tuple[int, int]
    shape: tuple[int, int]
    wfm: float


def _level_table(present: np.ndarray) -> np.ndarray:
    """Normalised prediction value of each raw level, float64 (256,), given which levels occur."""
    levels = _RAW_PROB[present]
    lo, hi = levels.min(), levels.max()
    return (_RAW_PROB - lo) / (hi - lo) if hi != lo else _RAW_PROB.copy()


def _bounding_rect(mask: np.ndarray) -> Box | None:
    """Slices of the box around the nonzero pixels of a uint8 (h, w) mask; None when it is empty."""
    x, y, w, h = cv2.boundingRect(mask)
    return (slice(y, y + h), slice(x, x + w)) if w else None


def _grown(box: Box, by: int, shape: tuple[int, int]) -> Box:
    """``box`` grown by ``by`` px on every side, within an image of ``shape``."""
    return tuple(slice(max(s.start - by, 0), min(s.stop + by, size)) for s, size in zip(box, shape))


def _union(a: Box | None, b: Box | None) -> Box | None:
    if a is None or b is None:
        return a or b
    return tuple(slice(min(s.start, t.start), max(s.stop, t.stop)) for s, t in zip(a, b))


def _relative(box: Box, to: Box) -> Box:
    """``box`` in the coordinates of the enclosing box ``to``."""
    return tuple(slice(s.start - t.start, s.stop - t.start) for s, t in zip(box, to))


def _active_box(pred_u8: np.ndarray, band: Box | None) -> Box:
    """Box around ``band`` (the foreground grown by _WF_BAND px) and every nonzero prediction
    pixel; the whole frame when that box would be empty.

    Outside it every pixel is background at level 0, which has no error: 0 is the lowest level
    wherever it occurs, and min-max normalisation keeps it 0 (a constant 0 is not normalised).
    """
    return _union(_bounding_rect(pred_u8), band) or (slice(0, pred_u8.shape[0]), slice(0, pred_u8.shape[1]))


def _split_point(gt: np.ndarray, fg_box: Box | None) -> tuple[int, tuple[int, int]]:
    """Foreground size and the S-measure's split (cy, cx): MATLAB's 1-based rounded foreground
    centroid, (h, w) (one quadrant) without foreground or background. The integer sums are those
    of argwhere(gt).mean(axis=0)."""
    if fg_box is None:
        return 0, gt.shape
    rows, cols = fg_box
    inside = gt[fg_box].view(np.uint8)
    per_row = cv2.reduce(inside, 1, cv2.REDUCE_SUM, dtype=cv2.CV_32S).ravel()
    per_col = cv2.reduce(inside, 0, cv2.REDUCE_SUM, dtype=cv2.CV_32S).ravel()
    n_fg = int(per_row.sum())
    if n_fg == gt.size:
        return n_fg, gt.shape
    cy = int(np.round((np.arange(rows.start, rows.stop) * per_row).sum() / n_fg)) + 1
    cx = int(np.round((np.arange(cols.start, cols.stop) * per_col).sum() / n_fg)) + 1
    return n_fg, (cy, cx)


def _quadrant_blocks(shape: tuple[int, int], split: tuple[int, int]) -> tuple[Box, ...]:
    """The S-measure's quadrants lt, rt, lb, rb of an image of ``shape`` split at (cy, cx)."""
    (h, w), (cy, cx) = shape, split
    top, bottom, left, right = slice(0, cy), slice(cy, h), slice(0, cx), slice(cx, w)
    return (top, left), (top, right), (bottom, left), (bottom, right)


def _box_histogram(pred_box: np.ndarray, gt_box: np.ndarray, split: tuple[int, int]) -> np.ndarray:
    """(4 quadrants, 2 gt, 256 levels) float64 counts of a box; split: (cy, cx) in box coordinates."""
    hist = np.zeros((4, 256, 2), np.float32)  # cv2.calcHist's float32 counts are exact below 2**24
    gt_u8 = gt_box.view(np.uint8)
    for quadrant, block in enumerate(_quadrant_blocks(gt_box.shape, split)):
        if gt_u8[block].size:
            hist[quadrant] = cv2.calcHist([pred_box[block], gt_u8[block]], [0, 1], None, [256, 2], [0, 256, 0, 2])
    return np.ascontiguousarray(hist.transpose(0, 2, 1), dtype=np.float64)  # C order: fast reductions


def _outside_counts(shape: tuple[int, int], box: Box, split: tuple[int, int]) -> list[int]:
    """Pixels of each S-measure quadrant (lt, rt, lb, rb) outside ``box``."""

    def overlap(a: slice, b: slice) -> int:
        return max(0, min(a.stop, b.stop) - max(a.start, b.start))

    return [
        (rows.stop - rows.start) * (cols.stop - cols.start) - overlap(rows, box[0]) * overlap(cols, box[1])
        for rows, cols in _quadrant_blocks(shape, split)
    ]


def _frame_histogram(pred_u8: np.ndarray, gt: np.ndarray, box: Box, split: tuple[int, int]) -> np.ndarray:
    """(4 quadrants, 2 gt, 256 levels) float64 counts of the frame, counted in ``box``; every
    pixel outside it is background at level 0 (see :func:`_active_box`)."""
    box_split = (max(split[0] - box[0].start, 0), max(split[1] - box[1].start, 0))
    hist = _box_histogram(pred_u8[box], gt[box], box_split)
    hist[:, 0, 0] += _outside_counts(gt.shape, box, split)
    return hist


def _foreground_distances(gt: np.ndarray) -> np.ndarray:
    """Euclidean distance of every pixel to the nearest foreground pixel, float32 (h, w) (float64 on
    huge images); gt: bool (h, w), holding every foreground pixel of the frame.

    OpenCV's exact transform in float32, several times faster than scipy's: :func:`_squared`
    turns its values back into scipy's exact numbers. Huge images fall back to scipy.
    """
    h, w = gt.shape
    if h * h + w * w >= 4_000_000:  # beyond this float32 no longer pins the integer square
        from scipy.ndimage import distance_transform_edt  # imported here: workers rarely need scipy

        return distance_transform_edt(~gt)
    return cv2.distanceTransform((~gt).view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def _squared(distances: np.ndarray) -> np.ndarray:
    """The integer squares of distances from :func:`_foreground_distances`, float64."""
    return np.rint(np.square(distances, dtype=np.float64))


def _weighted_false_positives(pred: np.ndarray, gt: np.ndarray, distances: np.ndarray) -> float:
    """The weighted F-measure's FPw: background errors (the prediction itself) weighted by
    ``2 - exp(log(0.5) / 5 * distance to the foreground)``; pred float64, gt bool, distances
    (:func:`_foreground_distances`), one box."""
    erring = np.logical_and(pred != 0, ~gt)
    importance = 2 - np.exp(np.log(0.5) / 5 * np.sqrt(_squared(distances[erring])))
    return (pred[erring] * importance).sum()


def _band_nearest(gt: np.ndarray, distances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Background pixels within _WF_BAND px (Chebyshev) of the foreground and their nearest
    foreground pixel, as scipy's feature transform picks it (see :func:`_offsets_by_distance`).

    gt: bool (h, w) holding every foreground pixel of the frame, _WF_BAND px or more from any
    border that is not the image's; distances: its :func:`_foreground_distances`. Returns flat
    indices into gt: band (B,), nearest (B,).
    """
    (h, w), pad = gt.shape, _BAND_PAD
    # 1 <= distance <= sqrt(_BAND_D2); no pixel is at sqrt(_BAND_D2 + 1) (19 is no sum of two squares)
    band_mask = cv2.inRange(distances, 1, np.sqrt(_BAND_D2 + 0.5))
    points = cv2.findNonZero(band_mask)  # (B, 1, 2) int32 (x, y), None if none
    if points is None:  # the foreground fills the box
        return np.zeros(0, np.intp), np.zeros(0, np.intp)
    cols, rows = points.reshape(-1, 2).T.astype(np.intp)
    # only the offsets at the pixel's own distance can hold its nearest foreground pixel
    choices = _squared(distances[rows, cols]).astype(np.intp) * _OFFSETS_BY_D2.shape[1]
    padded = cv2.copyMakeBorder(gt.view(np.uint8), pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0).ravel()
    padded_width = w + 2 * pad
    padded_steps = (_OFFSETS_BY_D2 @ [padded_width, 1]).ravel()
    candidates = ((rows + pad) * padded_width + cols + pad)[:, None] + padded_steps[choices[:, None] + _SLOTS]
    choices += padded[candidates].argmax(axis=1)  # the first foreground one
    band = rows * w + cols
    return band, band + (_OFFSETS_BY_D2 @ [w, 1]).ravel()[choices]


def _foreground_error_sum(pred: np.ndarray, gt: np.ndarray, distances: np.ndarray) -> float:
    """Sum over the foreground of min(E, EA): the error ``E = 1 - pred`` or, where smaller, its
    7x7 Gaussian smoothing EA, in which background pixels take the error of their nearest
    foreground pixel (the reference's Et).

    pred float64, gt bool, distances (:func:`_foreground_distances`): a box holding the foreground
    grown by _WF_BAND px within the image.
    """
    err = np.where(gt, 1 - pred, 0.0)
    band, nearest = _band_nearest(gt, distances)
    flat = err.ravel()
    flat[band] = flat[nearest]
    smooth = cv2.sepFilter2D(err, -1, _GAUSS_7_5, _GAUSS_7_5, borderType=cv2.BORDER_CONSTANT)
    return np.minimum(smooth, err, out=smooth).sum(where=gt)


def _weighted_f_measure_box(pred: np.ndarray, gt: np.ndarray, band: Box, n_fg: int, beta: float = WF_BETA) -> float:
    """Weighted F-measure from the active box: pred float64 (normalised), gt bool; band: the
    foreground (n_fg pixels) grown by _WF_BAND px, in box coordinates. Background outside the
    box has no error."""
    distances = _foreground_distances(gt)
    fp_w = _weighted_false_positives(pred, gt, distances)
    err_fg = _foreground_error_sum(pred[band], gt[band], distances[band])
    tp_w = n_fg - err_fg
    recall = 1 - err_fg / n_fg
    precision = tp_w / (tp_w + fp_w + EPS)
    return float((1 + beta) * recall * precision / (recall + beta * precision + EPS))


def _summarize_pixels(pred_u8: np.ndarray, gt: np.ndarray) -> _PixelSummary:
    """The per-pixel work of one frame: uint8 (h, w) prediction, bool (h, w) gt of the same size."""
    fg_box = _bounding_rect(gt.view(np.uint8))
    band = _grown(fg_box, _WF_BAND, gt.shape) if fg_box else None
    n_fg, split = _split_point(gt, fg_box)
    active = _active_box(pred_u8, band)
    hist = _frame_histogram(pred_u8, gt, active, split)
    table = _level_table(hist.sum(axis=(0, 1)) > 0)
    wfm = 0.0
    if n_fg:
        wfm = _weighted_f_measure_box(cv2.LUT(pred_u8[active], table), gt[active], _relative(band, active), n_fg)
    return _PixelSummary(hist, table, split, gt.shape, wfm)


# -- per-threshold arithmetic, all frames at once: arrays (F, ...) ----------------------------


def _weighted_std(values: np.ndarray, counts: np.ndarray, mean: np.ndarray) -> np.ndarray:
    n = counts.sum(axis=-1)
    spread = (counts * (values - mean[..., None]) ** 2).sum(axis=-1)
    return np.where(n > 1, np.sqrt(spread / np.maximum(n - 1, 1)), 0.0)


def _object_similarities(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Object similarity of each frame from values (F, 256) and their counts (F, 256); NaN for no count."""
    mean = (counts * values).sum(axis=-1) / counts.sum(axis=-1)
    return 2 * mean / (mean * mean + 1 + _weighted_std(values, counts, mean) + EPS)


def _region_ssims(hist: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Region SSIM of every quadrant, (F, 4), from hist (F, 4, 2, 256) and table (F, 256); an empty
    quadrant scores 0. Quadrants holding a single (gt, level) bin are left to the caller."""
    per_gt = hist.sum(axis=3)  # (F, 4, 2)
    per_level = hist.sum(axis=2)  # (F, 4, 256)
    n = per_gt.sum(axis=2)
    values = table[:, None, :]
    x = (per_level * values).sum(axis=2) / n
    y = per_gt[:, :, 1] / n
    dx = values - x[..., None]  # (F, 4, 256)
    dy = np.stack([-y, 1 - y], axis=-1)  # (F, 4, 2)
    sigma_x = (per_level * dx * dx).sum(axis=2) / (n - 1 + EPS)
    sigma_y = (per_gt * dy * dy).sum(axis=2) / (n - 1 + EPS)
    sigma_xy = ((hist * dx[:, :, None, :]).sum(axis=3) * dy).sum(axis=2) / (n - 1 + EPS)
    alpha = 4 * x * y * sigma_xy
    beta = (x * x + y * y) * (sigma_x + sigma_y)
    score = np.where(alpha != 0, alpha / (beta + EPS), np.where(beta == 0, 1.0, 0.0))
    return np.where(n == 0, 0.0, score)


def _ssim_constant_block(value: float, shape: tuple[int, int], block: Box) -> float:
    """Region SSIM of a quadrant where prediction and gt are both constant.

    Exactly 0/0 in theory; the reference scores 1 when its float mean of the block equals the value
    and 0 when rounding leaves a residue, so replay that mean on a same-layout array.
    """
    return 1.0 if np.full(shape, value)[block].mean() == value else 0.0


def _region_similarities(summaries, hist: np.ndarray, table: np.ndarray, size: np.ndarray) -> np.ndarray:
    """The S-measure's region term of every frame, (F,)."""
    ssims = _region_ssims(hist, table)
    for f, q in zip(*np.nonzero(np.count_nonzero(hist.reshape(*hist.shape[:2], -1), axis=2) == 1)):
        summary = summaries[f]
        level = np.flatnonzero(hist[f, q])[0] % 256
        ssims[f, q] = _ssim_constant_block(table[f, level], summary.shape, _quadrant_blocks(summary.shape, summary.split)[q])
    (h, w), (cy, cx) = np.array([s.shape for s in summaries]).T, np.array([s.split for s in summaries]).T
    w_lt, w_rt, w_lb = cx * cy / size, cy * (w - cx) / size, (h - cy) * cx / size
    return ssims[:, 0] * w_lt + ssims[:, 1] * w_rt + ssims[:, 2] * w_lb + ssims[:, 3] * (1 - w_lt - w_rt - w_lb)


def _s_measures(summaries, hist, table, fg, bg, size, alpha: float = S_ALPHA) -> np.ndarray:
    """S-measure of every frame, (F,); fg, bg: (F, 256) level counts, size (F,) pixels."""
    fg_ratio = fg.sum(axis=1) / size
    mean = ((fg + bg) * table).sum(axis=1) / size
    with np.errstate(divide="ignore", invalid="ignore"):  # frames without fg or bg: replaced below
        object_score = _object_similarities(table, fg) * fg_ratio + _object_similarities(1 - table, bg) * (1 - fg_ratio)
        score = np.maximum(0.0, alpha * object_score + (1 - alpha) * _region_similarities(summaries, hist, table, size))
    return np.where(fg_ratio == 0, 1 - mean, np.where(fg_ratio == 1, mean, score))


def _threshold_counts(start: np.ndarray, counts: np.ndarray, n_bins: int) -> np.ndarray:
    """Positive pixels at each of the 256 thresholds, (F, 256), from the pixel counts of each
    level (F, 256) and the index of the first threshold at which the level is positive (F, 256),
    one of ``n_bins``."""
    frames = start.shape[0]
    index = (start + n_bins * np.arange(frames)[:, None]).ravel()
    per_bin = np.bincount(index, weights=counts.ravel(), minlength=frames * n_bins).reshape(frames, n_bins)
    return np.cumsum(per_bin[:, :N_THRESHOLDS], axis=1)


def _binary_at_half(fg: np.ndarray, per_level: np.ndarray, n_fg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dice and IoU of the raw ``pred / 255 >= 0.5`` of every frame, (F,) each; 0 when both are empty."""
    tp = fg[:, _BINARY_AT_HALF].sum(axis=1)
    n_pred = per_level[:, _BINARY_AT_HALF].sum(axis=1)
    total, union = n_pred + n_fg, n_pred + n_fg - tp
    dice = np.divide(2 * tp, total, out=np.zeros_like(tp), where=total > 0)
    return dice, np.divide(tp, union, out=np.zeros_like(tp), where=union > 0)


def _scores_from_summaries(summaries: list[_PixelSummary]) -> tuple[np.ndarray, np.ndarray]:
    """Scalars (F, len(SCALAR_NAMES)) and curves (F, len(CURVE_NAMES), 256) of frames' pixel summaries."""
    hist = np.stack([s.hist for s in summaries])  # (F, 4, 2, 256)
    table = np.stack([s.table for s in summaries])  # (F, 256)
    both = hist.sum(axis=1)
    bg, fg = both[:, 0], both[:, 1]
    per_level = bg + fg
    size, n_fg = per_level.sum(axis=1), fg.sum(axis=1)
    column_size, column_fg = size[:, None], n_fg[:, None]

    mae_value = ((bg * table).sum(axis=1) + (fg * (1 - table)).sum(axis=1)) / size
    mean_pred = (per_level * table).sum(axis=1) / size
    adaptive = table >= np.minimum(2 * mean_pred, 1)[:, None]
    tp_a, fp_a = (fg * adaptive).sum(axis=1), (bg * adaptive).sum(axis=1)
    dice05, iou05 = _binary_at_half(fg, per_level, n_fg)

    byte_start = 255 - (table * 255).astype(np.uint8).astype(np.intp)
    tp8, fp8 = (_threshold_counts(byte_start, counts, N_THRESHOLDS) for counts in (fg, bg))
    float_start = _float_threshold_start(table)
    tpf, fpf = (_threshold_counts(float_start, counts, N_THRESHOLDS + 1) for counts in (fg, bg))

    scalars = np.column_stack(
        [
            _s_measures(summaries, hist, table, fg, bg, size),
            [s.wfm for s in summaries],
            mae_value,
            _enhanced_alignment(tp_a, fp_a, n_fg, size),
            _f_beta(tp_a, fp_a, n_fg),
            dice05,
            iou05,
        ]
    )
    curves = np.concatenate(
        [
            _enhanced_alignment(tp8, fp8, column_fg, column_size)[:, None],
            _f_beta(tp8, fp8, column_fg)[:, None],
            _toolbox_rates(tpf, fpf, column_fg, column_size),
        ],
        axis=1,
    )
    return scalars, curves


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
