"""Find ground-truth and prediction frames on disk and read them.

Layouts understood (every image extension in :data:`IMAGE_EXTENSIONS`):

* SUN-SEG: ``<data-root>/TestEasyDataset|TestHardDataset/Seen|Unseen/GT/<case>/*.png``;
* clips: ``<root>/<clip>/*.png`` or ``<root>/<clip>/masks/*.png``;
* an image folder: ``<root>/*.png`` (one group named :data:`IMAGE_GROUP`);
* a Kvasir-style root ``<root>/images/`` + ``<root>/masks/``: the ground truth is ``<root>/masks``.

Hidden files and folders (names starting with ``.``, e.g. macOS ``._005.png``) are ignored.
Predictions are matched to ground truth by clip name and file stem:
``<pred-root>/<clip>/<stem>.<any ext>`` (or ``<pred-root>/<stem>.*`` for an image folder); two
files with one stem (``003.png`` and ``003.jpg``) are an error.
Frames are ordered by the last number in their stem (``case1_3_a_12`` -> 12), ties in natural order.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
IMAGE_GROUP = "images"
SUN_SEG_SPLITS = {"easy": "TestEasyDataset", "hard": "TestHardDataset"}
SUN_SEG_SUBSETS = {"seen": "Seen", "unseen": "Unseen"}

_FRAME_NUMBER = re.compile(r"(\d+)\D*$")  # the last run of digits in a stem


class EvalInputError(Exception):
    """Bad input data: the CLI prints the message as one line and exits with status 2."""


def warn(message: str) -> None:
    """One line ``vps-eval: warning: ...`` on stderr."""
    print(f"vps-eval: warning: {message}", file=sys.stderr)


@dataclass
class Clip:
    """One clip: its name and its ground-truth frames in playing order.

    predictions: same length as gt_frames, the matched prediction file or None when missing.
    """

    name: str
    gt_frames: list[Path]
    predictions: list[Path | None] = field(default_factory=list)


def is_hidden(path: Path) -> bool:
    """Names starting with ``.`` (dot files, macOS ``._*`` resource forks) are never data."""
    return path.name.startswith(".")


def is_image(path: Path) -> bool:
    return not is_hidden(path) and path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def frame_number(path: Path) -> int | None:
    """The last number in the stem (``case1_3_a_12`` -> 12, ``12_mask`` -> 12), None without digits."""
    match = _FRAME_NUMBER.search(path.stem)
    return int(match.group(1)) if match else None


@lru_cache(maxsize=1)
def _natural_key_function():
    from natsort import natsort_keygen  # imported here: spawned workers only read images

    return natsort_keygen()


def _natural_key(name: str):
    return _natural_key_function()(name)


def frame_sort_key(path: Path):
    """Sort by the stem's frame number, then naturally (``a_2`` before ``a_10``); unnumbered last."""
    number = frame_number(path)
    return (float("inf") if number is None else number, _natural_key(path.name))


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (hidden files ignored), in frame order."""
    return sorted((p for p in folder.iterdir() if is_image(p)), key=frame_sort_key)


def _clip_frame_folder(clip_dir: Path) -> Path:
    masks = clip_dir / "masks"
    return masks if masks.is_dir() else clip_dir


def kvasir_masks_root(root: Path) -> Path | None:
    """``root/masks`` when ``root`` is a Kvasir-style root (``images/`` photos beside ``masks/``), else None."""
    root = Path(root)
    images, masks = root / "images", root / "masks"
    if images.is_dir() and masks.is_dir() and not list_images(root) and list_images(masks):
        return masks
    return None


def _check_unique_stems(frames: list[Path], what: str) -> None:
    """Raise EvalInputError naming two files of ``frames`` that share a stem (``003.png``, ``003.jpg``)."""
    seen: dict[str, Path] = {}
    for path in frames:
        if path.stem in seen:
            first, second = sorted((seen[path.stem], path), key=lambda p: p.name)
            raise EvalInputError(
                f"two {what} files with stem {path.stem}: {first} and {second} (keep one)"
            )
        seen[path.stem] = path


def find_gt_clips(gt_root: Path) -> list[Clip]:
    """Ground-truth clips under ``gt_root`` (clip layout or one image folder), naturally sorted.

    A Kvasir-style root (``images/`` + ``masks/``) stands for its ``masks/`` folder (see
    :func:`kvasir_masks_root`; the CLI says so on stderr). Hidden files and folders are ignored.
    Raises EvalInputError naming the expected layout when nothing is found, or naming two ground-truth
    files of one clip that share a stem.
    """
    gt_root = Path(gt_root)
    if not gt_root.is_dir():
        raise EvalInputError(f"ground-truth root {gt_root} is not a folder")
    gt_root = kvasir_masks_root(gt_root) or gt_root
    direct = list_images(gt_root)
    if direct:
        _check_unique_stems(direct, "ground-truth")
        return [Clip(IMAGE_GROUP, direct)]
    clips = []
    clip_dirs = (d for d in gt_root.iterdir() if d.is_dir() and not is_hidden(d))
    for clip_dir in sorted(clip_dirs, key=lambda d: _natural_key(d.name)):
        frames = list_images(_clip_frame_folder(clip_dir))
        if frames:
            _check_unique_stems(frames, f"ground-truth (clip {clip_dir.name})")
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


def _images_by_stem(folder: Path, wanted: set[str], what: str) -> dict[str, Path]:
    """Image files of ``folder`` by stem; two files with one wanted stem raise EvalInputError."""
    if not folder.is_dir():
        return {}
    images = [p for p in folder.iterdir() if is_image(p)]
    _check_unique_stems([p for p in images if p.stem in wanted], what)
    return {p.stem: p for p in images}


def match_predictions(clips: list[Clip], pred_root: Path) -> list[str]:
    """Fill every clip's ``predictions`` from ``pred_root``; returns descriptions of what is missing.

    A clip's predictions are looked up in ``<pred-root>/<clip>/`` (or its ``masks/``), the image group's
    in ``<pred-root>/`` itself. Two prediction files for one frame (``003.png`` and ``003.jpg``) raise
    EvalInputError naming both.
    """
    pred_root = Path(pred_root)
    if not pred_root.is_dir():
        raise EvalInputError(f"prediction root {pred_root} is not a folder")
    missing = []
    for clip in clips:
        folder = pred_root if clip.name == IMAGE_GROUP else _clip_frame_folder(pred_root / clip.name)
        wanted = {frame.stem for frame in clip.gt_frames}
        by_stem = _images_by_stem(folder, wanted, f"prediction (clip {clip.name})")
        clip.predictions = [by_stem.get(frame.stem) for frame in clip.gt_frames]
        if not by_stem:
            missing.append(f"clip {clip.name} ({folder} has no images)")
            continue
        lost = [frame.stem for frame, pred in zip(clip.gt_frames, clip.predictions) if pred is None]
        if lost:
            shown = ", ".join(lost[:3]) + (", ..." if len(lost) > 3 else "")
            missing.append(f"{len(lost)} frame(s) of clip {clip.name} ({shown})")
    return missing


def read_grey_checked(path: Path) -> tuple[np.ndarray, bool]:
    """uint8 (h, w) grey image and whether it was a 16-bit image holding 8-bit values.

    8-bit images are read as the toolbox reads them (``cv2.IMREAD_GRAYSCALE``). A 16-bit image whose
    values are all <= 255 holds 8-bit values: they are kept as they are (the toolbox's reader would
    shift them right by 8 bits, to all 0). Any other 16-bit (or float) image is read as the toolbox
    reads it: ``cv2.IMREAD_GRAYSCALE``, which maps 0..65535 to 0..255 (``value >> 8``).
    Raises EvalInputError if unreadable.
    """
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH)
    if image is None:
        raise EvalInputError(f"cannot read image {path}")
    if image.dtype == np.uint8:
        return image, False
    if image.dtype == np.uint16 and image.max() <= 255:
        return image.astype(np.uint8), True
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise EvalInputError(f"cannot read image {path}")
    return image, False


def read_grey(path: Path) -> np.ndarray:
    """uint8 (h, w) grey image (see :func:`read_grey_checked`). Raises EvalInputError if unreadable."""
    return read_grey_checked(path)[0]
