"""Polyp-free crops: regions of real frames with no mask pixel, to train and measure on frames without a polyp.

Real colonoscopy video is mostly polyp-free, but every annotated frame holds a polyp. A crop that
stays clear of the mask (with a margin) is a real polyp-free view of the same mucosa, light and
endoscope; it is resized like any frame, so the model sees it as a whole frame.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import replace
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from vps.train.data import DataError, Sample

NEGATIVE_SOURCE = "polyp-free"
GRID = 48  # the mask is reduced to a GRID x GRID occupancy grid; one cell is the safety margin


def _occupancy_grid(mask: np.ndarray) -> np.ndarray:
    """H x W bool -> GRID x GRID bool, a cell True where any mask pixel falls in it, dilated by one cell."""
    height, width = mask.shape
    rows = np.minimum(np.arange(height) * GRID // height, GRID - 1)
    cols = np.minimum(np.arange(width) * GRID // width, GRID - 1)
    grid = np.zeros((GRID, GRID), dtype=bool)
    ys, xs = np.nonzero(mask)
    grid[rows[ys], cols[xs]] = True
    padded = np.pad(grid, 1)
    dilated = np.zeros_like(grid)
    for dy in range(3):
        for dx in range(3):
            dilated |= padded[dy:dy + GRID, dx:dx + GRID]
    return dilated


def find_polyp_free_box(mask: np.ndarray, min_fraction: float, rng: random.Random
                        ) -> Optional[Tuple[int, int, int, int]]:
    """The largest box (left, top, right, bottom) of the frame's aspect ratio, at least ``min_fraction`` of
    each side, holding no mask pixel (one grid cell of margin), at a random feasible position; None if none fits.
    """
    height, width = mask.shape
    occupied = _occupancy_grid(mask).astype(np.int32)
    integral = np.pad(occupied.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    smallest = max(1, int(np.ceil(min_fraction * GRID)))
    for side in range(GRID - 1, smallest - 1, -1):  # grid cells per side; the frame's aspect is kept
        sums = (integral[side:, side:] - integral[:-side, side:] - integral[side:, :-side] + integral[:-side, :-side])
        free = np.argwhere(sums == 0)
        if len(free):
            top, left = free[rng.randrange(len(free))]
            return (int(left * width // GRID), int(top * height // GRID),
                    int((left + side) * width // GRID), int((top + side) * height // GRID))
    return None


def polyp_free_crops(samples: Sequence[Sample], fraction: float, min_fraction: float = 0.3, seed: int = 0
                     ) -> List[Sample]:
    """Polyp-free crops from a seeded ``fraction`` of ``samples`` (at most one per image).

    Each crop is a Sample of source ``polyp-free`` whose ``crop`` box holds no mask pixel; images where no
    box of at least ``min_fraction`` of each side fits are skipped. The choice depends only on the seed
    and the file names, so a resumed or repeated run cuts the same crops.
    """
    if not 0 <= fraction <= 1:
        raise DataError(f"data.negatives fraction must be in [0, 1], got {fraction}")
    chosen = [s for s in samples if random.Random(f"{seed}:{s.image.name}:{s.group}").random() < fraction]
    crops = []
    for sample in chosen:
        with Image.open(sample.mask) as mask_file:
            mask = np.asarray(mask_file.convert("L")) > 128
        rng = random.Random(int(hashlib.sha256(f"{seed}:{sample.mask}".encode()).hexdigest()[:8], 16))
        box = find_polyp_free_box(mask, min_fraction, rng)
        if box is not None:
            crops.append(replace(sample, source=NEGATIVE_SOURCE, group=f"{sample.group}@{sample.image.stem}:crop",
                                 crop=box))
    return crops
