"""Find ground-truth and prediction frames on disk and read them.

Layouts understood (every image extension in :data:`IMAGE_EXTENSIONS`):

* SUN-SEG: ``<data-root>/TestEasyDataset|TestHardDataset/Seen|Unseen/GT/<case>/*.png``;
* clips: ``<root>/<clip>/*.png`` or ``<root>/<clip>/masks/*.png``;
* an image folder: ``<root>/*.png`` (one group named :data:`IMAGE_GROUP`).

Predictions are matched to ground truth by clip name and file stem:
``<pred-root>/<clip>/<stem>.<any ext>`` (or ``<pred-root>/<stem>.*`` for an image folder).
Frames are ordered by their trailing frame number (``case1_3_a_12`` -> 12), ties in natural order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from natsort import natsort_keygen

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
IMAGE_GROUP = "images"
SUN_SEG_SPLITS = {"easy": "TestEasyDataset", "hard": "TestHardDataset"}
SUN_SEG_SUBSETS = {"seen": "Seen", "unseen": "Unseen"}

_natural_key = natsort_keygen()
_TRAILING_NUMBER = re.compile(r"(\d+)$")


class EvalInputError(Exception):
    """Bad input data: the CLI prints the message as one line and exits with status 2."""


@dataclass
class Clip:
    """One clip: its name and its ground-truth frames in playing order.

    predictions: same length as gt_frames, the matched prediction file or None when missing.
    """

    name: str
    gt_frames: list[Path]
    predictions: list[Path | None] = field(default_factory=list)


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def frame_sort_key(path: Path):
    """Sort by the stem's trailing frame number, then naturally (``a_2`` before ``a_10``)."""
    match = _TRAILING_NUMBER.search(path.stem)
    number = int(match.group(1)) if match else float("inf")
    return (number, _natural_key(path.name))


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, in frame order."""
    return sorted((p for p in folder.iterdir() if is_image(p)), key=frame_sort_key)


def _clip_frame_folder(clip_dir: Path) -> Path:
    masks = clip_dir / "masks"
    return masks if masks.is_dir() else clip_dir


def find_gt_clips(gt_root: Path) -> list[Clip]:
    """Ground-truth clips under ``gt_root`` (clip layout or one image folder), naturally sorted.

    Raises EvalInputError naming the expected layout when nothing is found.
    """
    gt_root = Path(gt_root)
    if not gt_root.is_dir():
        raise EvalInputError(f"ground-truth root {gt_root} is not a folder")
    direct = list_images(gt_root)
    if direct:
        return [Clip(IMAGE_GROUP, direct)]
    clips = []
    for clip_dir in sorted((d for d in gt_root.iterdir() if d.is_dir()), key=lambda d: _natural_key(d.name)):
        frames = list_images(_clip_frame_folder(clip_dir))
        if frames:
            clips.append(Clip(clip_dir.name, frames))
    if not clips:
        raise EvalInputError(
            f"no ground truth under {gt_root}: expected images in <root>/*.png, "
            f"<root>/<clip>/*.png or <root>/<clip>/masks/*.png"
        )
    return clips


def sun_seg_gt_root(data_root: Path, split: str, subset: str) -> Path:
    """``<data-root>/TestEasyDataset|TestHardDataset/Seen|Unseen/GT``; raises EvalInputError if absent."""
    gt_root = Path(data_root) / SUN_SEG_SPLITS[split] / SUN_SEG_SUBSETS[subset] / "GT"
    if not gt_root.is_dir():
        raise EvalInputError(
            f"{data_root} is not a SUN-SEG root: expected {gt_root} "
            f"(<data-root>/{SUN_SEG_SPLITS[split]}/{SUN_SEG_SUBSETS[subset]}/GT/<case>/*.png)"
        )
    return gt_root


def _images_by_stem(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in folder.iterdir() if is_image(p)}


def match_predictions(clips: list[Clip], pred_root: Path) -> list[str]:
    """Fill every clip's ``predictions`` from ``pred_root``; returns descriptions of what is missing.

    A clip's predictions are looked up in ``<pred-root>/<clip>/`` (or its ``masks/``), the image group's
    in ``<pred-root>/`` itself.
    """
    pred_root = Path(pred_root)
    if not pred_root.is_dir():
        raise EvalInputError(f"prediction root {pred_root} is not a folder")
    missing = []
    for clip in clips:
        folder = pred_root if clip.name == IMAGE_GROUP else _clip_frame_folder(pred_root / clip.name)
        by_stem = _images_by_stem(folder)
        clip.predictions = [by_stem.get(frame.stem) for frame in clip.gt_frames]
        if not by_stem:
            missing.append(f"clip {clip.name} ({folder} has no images)")
            continue
        lost = [frame.stem for frame, pred in zip(clip.gt_frames, clip.predictions) if pred is None]
        if lost:
            shown = ", ".join(lost[:3]) + (", ..." if len(lost) > 3 else "")
            missing.append(f"{len(lost)} frame(s) of clip {clip.name} ({shown})")
    return missing


def read_grey(path: Path) -> np.ndarray:
    """uint8 (h, w) grey image; 16-bit images are scaled to 8 bits. Raises EvalInputError if unreadable."""
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise EvalInputError(f"cannot read image {path}")
    return image
