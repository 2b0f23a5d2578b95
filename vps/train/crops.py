"""Random crops (``data.random_crop``): seeded square regions of each image, cut before the resize to the model input.

Every image is resized to the model's square input (256 x 256 for LiteMedSAM), so small objects in large
images, such as nuclei of a few dozen pixels in 1000 x 1000 MoNuSeg tiles, shrink to a few pixels. A crop
of ``size`` pixels is resized instead, keeping them at their scale (``vps-segment --stills --tile`` does the
same at inference). The crops are drawn once from a seed and the file names, so every run, resume and
epoch sees the same ones, and with the embedding cache each crop's SAM embedding is computed once.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import List, Sequence

from PIL import Image

from vps.train.data import Sample


def random_crops(samples: Sequence[Sample], size: int, per_image: int, seed: int = 0) -> List[Sample]:
    """Each sample -> ``per_image`` samples whose ``crop`` is a ``size`` x ``size`` box at a seeded random position.

    A side shorter than ``size`` is kept whole; an image no larger than the crop is kept as it is (once).
    """
    crops: List[Sample] = []
    for sample in samples:
        with Image.open(sample.image) as image_file:
            width, height = image_file.size
        crop_width, crop_height = min(size, width), min(size, height)
        if (crop_width, crop_height) == (width, height):
            crops.append(sample)
            continue
        rng = random.Random(f"{seed}:{sample.image.name}:{sample.group}")
        for _ in range(per_image):
            left, top = rng.randint(0, width - crop_width), rng.randint(0, height - crop_height)
            crops.append(replace(sample, crop=(left, top, left + crop_width, top + crop_height)))
    return crops
