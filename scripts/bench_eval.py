"""Benchmark: frames/s of ``eval`` against a per-frame loop over pysodmetrics, same frames, same numbers.

Usage::

    python scripts/bench_eval.py [--data ../shared/data/cvc-clinicdb-video] [--workers N] [--repeats 3]

Ground truth: the CVC-ClinicDB video masks (``<clip>/masks/*.png``); predictions: each mask shifted
and blurred (written to a temporary folder). Without that folder, synthetic 288x384 frames are used.
Both sides read the PNGs and compute S-alpha, weighted F, MAE, E-phi and F-beta (curves and adaptive),
Sen/Spe/Dice/IoU curves, on every frame (image protocol: nothing dropped). The script asserts that
the numbers agree before printing the speed ratio.

Sen/Spe/Dice/IoU: pysodmetrics bins the prediction to 8 bits while the SUN-SEG toolbox compares
the float prediction against ``linspace(1, 0, 256)``; the two differ on pixels lying exactly on a
threshold, so those four curves are compared on the dataset means within 1e-3 (the exact toolbox
definition is proved in tests/test_eval_metrics.py); all other metrics agree per frame within 1e-6.

Prints the load average and the CPU time of each side too: on a machine shared with other jobs the
wall-time ratio moves with the load, the CPU-time ratio much less. It also prints which ``eval``
it measured: from a git worktree of an editable install, run it as ``PYTHONPATH=. python
scripts/bench_eval.py``, else it imports the installed checkout's ``eval``.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import cv2
import numpy as np

import eval.metrics as eval_metrics
from eval.metrics import CURVE_NAMES, SCALAR_NAMES
from eval.protocol import idle_cores, score_clips
from eval.readers import find_gt_clips, match_predictions

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cvc-clinicdb-video"


def nproc() -> str:
    try:
        return subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return str(os.cpu_count())


def degrade_mask(mask: np.ndarray, shift: int = 6, sigma: float = 4.0) -> np.ndarray:
    """uint8 (h, w) mask -> uint8 soft prediction: shifted, blurred, scaled to at most 230."""
    h, w = mask.shape
    moved = cv2.warpAffine(mask, np.float32([[1, 0, shift], [0, 1, shift]]), (w, h))
    soft = cv2.GaussianBlur(moved.astype(np.float32), (0, 0), sigma)
    return np.clip(soft * (230 / 255), 0, 255).astype(np.uint8)


def synthetic_masks(root: Path, n_clips: int = 8, n_frames: int = 30, shape=(288, 384)) -> Path:
    """Write moving-ellipse masks ``root/<clip>/masks/<i>.png``; returns root."""
    rng = np.random.default_rng(0)
    for c in range(n_clips):
        folder = root / f"clip{c:02d}" / "masks"
        folder.mkdir(parents=True)
        cy, cx = rng.uniform(60, 220), rng.uniform(60, 320)
        for i in range(n_frames):
            mask = np.zeros(shape, np.uint8)
            centre = (int(cx + 2 * i), int(cy + i))
            cv2.ellipse(mask, centre, (40 + i % 7, 30), i * 3, 0, 360, 255, -1)
            cv2.imwrite(str(folder / f"{i + 1:03d}.png"), mask)
    return root


def write_predictions(gt_root: Path, pred_root: Path):
    clips = find_gt_clips(gt_root)
    for clip in clips:
        (pred_root / clip.name).mkdir(parents=True, exist_ok=True)
        for frame in clip.gt_frames:
            mask = cv2.imread(str(frame), cv2.IMREAD_GRAYSCALE)
            cv2.imwrite(str(pred_root / clip.name / f"{frame.stem}.png"), degrade_mask(mask))
    match_predictions(clips, pred_root)
    return clips


def reference_loop(pairs):
    """pysodmetrics on every (gt, pred) pair; returns per-frame scalars (F, 5) and curves dict."""
    import py_sod_metrics as psm

    sm, wfm, mae, em = psm.Smeasure(), psm.WeightedFmeasure(), psm.MAE(), psm.Emeasure()
    rates = psm.FmeasureV2(
        {
            "Fm": psm.FmeasureHandler(with_dynamic=True, with_adaptive=True, beta=0.3),
            "Sen": psm.SensitivityHandler(with_dynamic=True, with_adaptive=False),
            "Spe": psm.SpecificityHandler(with_dynamic=True, with_adaptive=False),
            "Dice": psm.DICEHandler(with_dynamic=True, with_adaptive=False),
            "IoU": psm.IOUHandler(with_dynamic=True, with_adaptive=False),
        }
    )
    for gt_path, pred_path in pairs:
        gt = cv2.imread(str(gt_path), cv2.IMREAD_GRAYSCALE)
        pred = cv2.imread(str(pred_path), cv2.IMREAD_GRAYSCALE)
        for metric in (sm, wfm, mae, em, rates):
            metric.step(pred, gt)
    handlers = rates._metric_handlers
    scalars = {
        "Smeasure": sm.sms,
        "wFmeasure": wfm.weighted_fms,
        "MAE": mae.maes,
        "adpEm": em.adaptive_ems,
        "adpFm": handlers["Fm"].adaptive_results,
    }
    curves = {"Em": em.changeable_ems, **{k: h.dynamic_results for k, h in handlers.items()}}
    return {k: np.asarray(v, np.float64) for k, v in scalars.items()}, {
        k: np.asarray(v, np.float64) for k, v in curves.items()
    }


def cpu_seconds() -> float:
    """CPU time of this process and of its children that have ended (the worker processes)."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def timed(run):
    """(run(), wall seconds, CPU seconds); on a shared machine the CPU time is the steadier number."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = run()
    return result, time.perf_counter() - wall, cpu_seconds() - cpu


def check_agreement(ours_scalars, ours_curves, ref_scalars, ref_curves) -> float:
    """Assert agreement; returns the largest per-frame difference of the exactly comparable metrics."""
    worst = 0.0
    for name, ref in ref_scalars.items():
        worst = max(worst, np.abs(ours_scalars[:, SCALAR_NAMES.index(name)] - ref).max())
    for name in ("Em", "Fm"):
        worst = max(worst, np.abs(ours_curves[:, CURVE_NAMES.index(name)] - ref_curves[name]).max())
    assert worst < 1e-6, f"per-frame disagreement {worst}"
    for name in ("Sen", "Spe", "Dice", "IoU"):
        ref = ref_curves[name]
        # the toolbox's rule: no true positive at a threshold -> Sen, Spe, Dice, IoU are 0
        ref = np.where(ref_curves["Sen"] > 0, ref, 0.0)
        ours = ours_curves[:, CURVE_NAMES.index(name)]
        for reduce in (np.mean, np.max):
            gap = abs(reduce(ours.mean(axis=0)) - reduce(ref.mean(axis=0)))
            assert gap < 1e-3, f"{name}: dataset {reduce.__name__} differs by {gap}"
    return worst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--workers", type=int, help="vps-eval's --workers (default: as vps-eval, the idle cores)")
    parser.add_argument("--repeats", type=int, default=3, help="best of N timings for each side")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    workers = args.workers or idle_cores()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gt_root = args.data if args.data.is_dir() else synthetic_masks(tmp / "gt")
        clips = write_predictions(gt_root, tmp / "pred")
        pairs = [pair for clip in clips for pair in zip(clip.gt_frames, clip.predictions)]
        shape = cv2.imread(str(pairs[0][0]), cv2.IMREAD_GRAYSCALE).shape

        load_before = os.getloadavg()[0]
        ours, ref = (float("inf"), 0.0), (float("inf"), 0.0)  # best wall time, CPU time of that run
        for _ in range(args.repeats):
            scored, *timing = timed(lambda: score_clips(clips, "image", workers=workers))
            ours = min(ours, tuple(timing))
            (ref_scalars, ref_curves), *timing = timed(lambda: reference_loop(pairs))
            ref = min(ref, tuple(timing))
        load_after = os.getloadavg()[0]

        ours_scalars = np.concatenate([c.scalars for c in scored])
        ours_curves = np.concatenate([c.curves for c in scored])
        worst = check_agreement(ours_scalars, ours_curves, ref_scalars, ref_curves)

    from vps.hardware import cpu_name  # imported here: `import vps` loads torch, spawned workers re-import this script

    n = len(pairs)
    print(f"data: {gt_root if gt_root == args.data else 'synthetic'}: {n} frames of {shape[0]}x{shape[1]}")
    print(f"hardware: nproc={nproc()}, CPU: {cpu_name()}; workers={workers}; "
          f"load average {load_before:.1f} before, {load_after:.1f} after")
    print(f"code measured: {Path(eval_metrics.__file__).parent}")
    print(f"agreement: max per-frame difference {worst:.2e} (S, wF, MAE, E-phi, F-beta)")
    print(f"pysodmetrics loop: {n / ref[0]:8.1f} frames/s ({ref[0]:.2f} s, CPU {ref[1]:.2f} s)")
    print(f"vps eval:          {n / ours[0]:8.1f} frames/s ({ours[0]:.2f} s, CPU {ours[1]:.2f} s with its workers)")
    print(f"speed-up: {ref[0] / ours[0]:.1f}x (CPU time: {ref[1] / ours[1]:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
