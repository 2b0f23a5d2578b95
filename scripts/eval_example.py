"""Worked example of ``vps-eval`` on the CVC-ClinicDB video clips.

Usage::

    python scripts/eval_example.py [--data ../shared/data/cvc-clinicdb-video] [--pred-root DIR] [--out-dir DIR]

Without ``--pred-root`` it first writes a baseline prediction folder: every ground-truth mask
shifted by 6 px, blurred (Gaussian, sigma 4) and its grey levels scaled to 0..230 - a soft,
slightly misplaced "prediction" with known behaviour. Replace it with a real model's
predictions (``<pred-root>/<clip>/<frame>.png``) to evaluate the model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

from eval.cli import main as vps_eval
from eval.readers import find_gt_clips

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cvc-clinicdb-video"


def degrade_mask(mask: np.ndarray, shift: int = 6, sigma: float = 4.0) -> np.ndarray:
    """uint8 (h, w) mask -> uint8 (h, w) soft prediction: shifted right/down, blurred, max 230."""
    h, w = mask.shape
    moved = cv2.warpAffine(mask, np.float32([[1, 0, shift], [0, 1, shift]]), (w, h))
    soft = cv2.GaussianBlur(moved.astype(np.float32), (0, 0), sigma)
    return np.clip(soft * (230 / 255), 0, 255).astype(np.uint8)


def write_baseline_predictions(gt_root: Path, pred_root: Path) -> int:
    """Write ``pred_root/<clip>/<stem>.png`` for every gt frame; returns the number of frames."""
    count = 0
    for clip in find_gt_clips(gt_root):
        folder = pred_root / clip.name
        folder.mkdir(parents=True, exist_ok=True)
        for frame in clip.gt_frames:
            mask = cv2.imread(str(frame), cv2.IMREAD_GRAYSCALE)
            cv2.imwrite(str(folder / f"{frame.stem}.png"), degrade_mask(mask))
            count += 1
    return count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--pred-root", type=Path, help="real predictions; default: make the baseline")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/eval_example"))
    parser.add_argument("--workers", type=int)
    args = parser.parse_args(argv)
    pred_root = args.pred_root
    if pred_root is None:
        pred_root = args.out_dir / "baseline_shift6_blur4"
        n = write_baseline_predictions(args.data, pred_root)
        print(f"wrote {n} baseline predictions to {pred_root}", file=sys.stderr)
    eval_args = ["--gt-root", str(args.data), "--pred-root", str(pred_root), "--out-dir", str(args.out_dir), "--all"]
    if args.workers:
        eval_args += ["--workers", str(args.workers)]
    return vps_eval(eval_args)


if __name__ == "__main__":
    sys.exit(main())
