"""Decode every training file once before training, so truncated or corrupt images stop the run up front.

Opening a header (``check_samples``) does not notice a JPEG or PNG cut short: PIL only fails when the pixels
are decoded, which otherwise happens in a DataLoader worker at the first batch. ``verify_decodable`` decodes
each image and mask fully (in threads; PIL releases the GIL while decoding) and raises one DataError listing
the files that fail. It costs one full decode per file, about what one epoch's first read costs.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, List, Optional

from PIL import Image

from vps.train.data import DataError


def decode_problem(path: str | Path) -> Optional[str]:
    """None when ``path`` decodes completely, else ``'<path>: <reason>'``."""
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as error:  # OSError (truncated), UnidentifiedImageError, DecompressionBombError, SyntaxError
        return f"{path}: {str(error) or type(error).__name__}"
    return None


def verify_decodable(samples: Iterable, workers: Optional[int] = None) -> None:
    """Fully decode the image and mask of every sample (objects with ``.image`` and an optional ``.mask``: one
    path or a tuple of paths, one per class).

    Raises DataError naming the first few files that cannot be decoded and how many there are in all.
    """
    paths: List[Path] = []
    seen = set()
    for sample in samples:
        masks = getattr(sample, "mask", None)
        for path in (getattr(sample, "image", None), *(masks if isinstance(masks, tuple) else (masks,))):
            if path is not None and path not in seen:
                seen.add(path)
                paths.append(path)
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        problems = [p for p in pool.map(decode_problem, paths) if p is not None]
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise DataError(f"{len(problems)} of {len(paths)} image files cannot be decoded (truncated or corrupt): "
                        f"{shown}")
