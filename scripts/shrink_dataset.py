"""A smaller copy of a training dataset, for machines that take little data (e.g. a GPU machine with a
transfer limit). Same layout and file stems, so the validation split and the polyp-free crops stay the
same images: every image scaled down to a longest side of --max-side pixels (never up) and saved as
JPEG, every mask binarised (> 128, as training reads it), scaled by area and saved as a 0/255 PNG.

    python scripts/shrink_dataset.py ../shared/data/kvasir-seg small/kvasir-seg --max-side 320 --quality 85

The built-in model was trained on such a copy (longest side 320, quality 85) of the CVC-ClinicDB clips
and the Kvasir-SEG stills; training resizes every image to 256 x 256 anyway.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

import vps  # noqa: F401
from vps.train.data import DataError, discover_samples, read_pair


def shrink(image: np.ndarray, mask: np.ndarray, max_side: int):
    """(H x W x 3 uint8 RGB, H x W bool) -> the same, scaled so the longest side is at most ``max_side``."""
    height, width = mask.shape
    scale = max_side / max(height, width)
    if scale >= 1:
        return image, mask
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    mask = cv2.resize(mask.astype(np.float32), size, interpolation=cv2.INTER_AREA) > 0.5
    return image, mask


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="a dataset folder in any layout vps-train reads")
    parser.add_argument("out", type=Path, help="new folder (must not exist, nor lie inside root)")
    parser.add_argument("--max-side", type=int, default=320)
    parser.add_argument("--quality", type=int, default=85, help="JPEG quality of the images (85)")
    args = parser.parse_args(argv)
    root, out = args.root.resolve(), args.out.resolve()
    try:
        if out.exists():
            raise DataError(f"{args.out} exists; choose a new folder")
        if out.is_relative_to(root) or root.is_relative_to(out):
            raise DataError(f"{args.out} and {args.root} must not contain one another")
        if args.max_side < 1 or not 1 <= args.quality <= 100:
            raise DataError("--max-side must be >= 1 and --quality within 1..100")
        samples = discover_samples(root)
        for sample in samples:
            image, mask = shrink(*read_pair(sample), args.max_side)
            image_path = out / sample.image.relative_to(root).with_suffix(".jpg")
            mask_path = out / sample.mask.relative_to(root).with_suffix(".png")
            image_path.parent.mkdir(parents=True, exist_ok=True)
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(image_path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, args.quality])
            cv2.imwrite(str(mask_path), mask.astype(np.uint8) * 255)
    except DataError as error:
        print(f"shrink_dataset: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {len(samples)} image/mask pairs to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
