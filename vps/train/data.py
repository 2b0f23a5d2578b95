"""Training data: image/mask pairs from the layouts the field uses, paired by file stem."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

MaskPaths = Union[Path, Tuple[Path, ...]]

import numpy as np
from natsort import natsorted
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


class DataError(ValueError):
    """Training data that is missing, unreadable or inconsistent; the message names the files."""


@dataclass(frozen=True)
class Sample:
    """One image/mask pair. ``group`` is the clip it comes from (or the image stem for stills).

    ``mask`` is one mask file, or one per class (``data.classes``: ``masks/<class>/<stem>.*``, in the order of
    the classes). ``source`` names the dataset (its root folder) for per-source validation; ``crop`` is an
    optional box (left, top, right, bottom) in pixels that cuts a region out of both image and mask.
    """

    image: Path
    mask: MaskPaths
    group: str
    source: str = ""
    crop: Optional[Tuple[int, int, int, int]] = None


def _image_files(folder: Path) -> Dict[str, Path]:
    files: Dict[str, Path] = {}
    for path in folder.iterdir():
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
            if path.stem in files:
                raise DataError(f"two files with stem '{path.stem}' in {folder}: {files[path.stem].name}, {path.name}")
            files[path.stem] = path
    return files


def pair_by_stem(image_dir: Path, mask_dir: Path, group: Optional[str] = None) -> List[Sample]:
    """Pairs ``image_dir/<stem>.*`` with ``mask_dir/<stem>.*`` (natural order); an unpaired file is an error."""
    images, masks = _image_files(image_dir), _image_files(mask_dir)
    if not images:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {image_dir}")
    without_mask = sorted(set(images) - set(masks))
    if without_mask:
        raise DataError(f"{len(without_mask)} images in {image_dir} have no mask in {mask_dir}: "
                        f"{', '.join(images[s].name for s in without_mask[:5])}")
    without_image = sorted(set(masks) - set(images))
    if without_image:
        raise DataError(f"{len(without_image)} masks in {mask_dir} have no image in {image_dir}: "
                        f"{', '.join(masks[s].name for s in without_image[:5])}")
    return [Sample(images[s], masks[s], group if group is not None else s) for s in natsorted(images)]


def discover_samples(root: str | Path, classes: Sequence[str] = ()) -> List[Sample]:
    """Find image/mask pairs under ``root`` in any of these layouts:

    - ``root/{images,masks}`` (Kvasir/CVC TrainDataset and TestDataset/<name>, MoNuSeg, GlaS): stills,
      each image its own group;
    - ``root/<clip>/{frames,masks}`` (the CVC-ClinicDB clips) or ``root/<clip>/{images,masks}``: grouped by clip;
    - ``root/Frame/<case>/*`` with ``root/GT/<case>/*`` (SUN-SEG): grouped by case.

    With ``classes`` (several named classes) only the stills layout is read, with one binary mask folder per
    class: ``root/images/<stem>.*`` and ``root/masks/<class>/<stem>.*`` for every class.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    samples = _discover_classes(root, classes) if classes else _discover(root)
    return [replace(s, source=root.resolve().name) for s in samples]


def _discover_classes(root: Path, classes: Sequence[str]) -> List[Sample]:
    missing = [c for c in classes if not (root / "masks" / c).is_dir()]
    if not (root / "images").is_dir() or missing:
        raise DataError(f"{root}: data.classes needs {root}/images and one mask folder per class, "
                        f"{root}/masks/<class>; missing: {', '.join(missing) if missing else 'images'}")
    per_class = [pair_by_stem(root / "images", root / "masks" / c) for c in classes]
    return [replace(parts[0], mask=tuple(p.mask for p in parts)) for parts in zip(*per_class)]


def mask_paths(sample: Sample) -> Tuple[Path, ...]:
    """The sample's mask files: one, or one per class."""
    return sample.mask if isinstance(sample.mask, tuple) else (sample.mask,)


def _discover(root: Path) -> List[Sample]:
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return pair_by_stem(root / "images", root / "masks")
    if (root / "Frame").is_dir() and (root / "GT").is_dir():
        cases = natsorted(p.name for p in (root / "Frame").iterdir() if p.is_dir())
        missing = [c for c in cases if not (root / "GT" / c).is_dir()]
        if missing:
            raise DataError(f"SUN-SEG cases without GT folder under {root / 'GT'}: {', '.join(missing[:5])}")
        return [s for c in cases for s in pair_by_stem(root / "Frame" / c, root / "GT" / c, group=c)]
    samples: List[Sample] = []
    for clip in natsorted(p for p in root.iterdir() if p.is_dir()):
        for image_dir_name in ("frames", "images"):
            if (clip / image_dir_name).is_dir() and (clip / "masks").is_dir():
                samples += pair_by_stem(clip / image_dir_name, clip / "masks", group=clip.name)
                break
    if not samples:
        raise DataError(f"{root} is not a known data layout: expected {root}/images + {root}/masks, "
                        f"{root}/<clip>/frames + {root}/<clip>/masks, or {root}/Frame/<case> + {root}/GT/<case>")
    return samples


def read_pair(sample: Sample) -> Tuple[np.ndarray, np.ndarray]:
    """Returns (H x W x 3 uint8 RGB image, H x W bool mask where mask value > 128); with one mask per class,
    a K x H x W mask."""
    masks = []
    try:
        with Image.open(sample.image) as image_file:
            image = np.asarray(image_file.convert("RGB"))
        for path in mask_paths(sample):
            with Image.open(path) as mask_file:
                masks.append(np.asarray(mask_file.convert("L")) > 128)
    except (OSError, UnidentifiedImageError) as error:
        raise DataError(f"cannot read {sample.image.name}/{mask_paths(sample)[len(masks)].name}: {error}") from None
    for path, mask in zip(mask_paths(sample), masks):
        if image.shape[:2] != mask.shape:
            raise DataError(f"image {sample.image} is {image.shape[1]}x{image.shape[0]} but its mask {path} "
                            f"is {mask.shape[1]}x{mask.shape[0]}")
    mask = np.stack(masks) if isinstance(sample.mask, tuple) else masks[0]
    if sample.crop is not None:
        left, top, right, bottom = sample.crop
        image, mask = image[top:bottom, left:right], mask[..., top:bottom, left:right]
    return image, mask


def check_samples(samples: Sequence[Sample]) -> None:
    """Open every header once so that unreadable files and size mismatches fail before training starts."""
    for sample in samples:
        for mask in mask_paths(sample):
            try:
                with Image.open(sample.image) as image_file, Image.open(mask) as mask_file:
                    image_size, mask_size = image_file.size, mask_file.size
            except (OSError, UnidentifiedImageError) as error:
                raise DataError(f"cannot read {sample.image} or {mask}: {error}") from None
            if image_size != mask_size:
                raise DataError(f"image {sample.image} is {image_size[0]}x{image_size[1]} but its mask {mask} "
                                f"is {mask_size[0]}x{mask_size[1]}")


def as_root_list(roots: Union[str, Path, Sequence[Union[str, Path]]]) -> List[Path]:
    """``data.root`` is one folder or a list of folders (one per source)."""
    if isinstance(roots, (str, Path)):
        return [Path(roots)]
    return [Path(r) for r in roots]


def split_sources(roots, val_groups: Optional[Sequence[str]] = None, val_fraction: float = 0.2, seed: int = 0,
                  classes: Sequence[str] = ()) -> Tuple[List[Sample], List[Sample]]:
    """Discover, check and split every source separately, so each keeps its own seeded validation part.

    ``val_groups`` names validation clips in any source; a source with none of them named draws a seeded
    ``val_fraction`` of its clips (stills count as one clip each). ``classes``: see ``discover_samples``.
    """
    train: List[Sample] = []
    val: List[Sample] = []
    named = {str(g) for g in val_groups} if val_groups is not None else None
    seen_groups = set()
    for root in as_root_list(roots):
        samples = discover_samples(root, classes)
        check_samples(samples)
        groups = {s.group for s in samples}
        seen_groups |= groups
        here = sorted(named & groups) if named is not None and named & groups else None
        part_train, part_val = split_by_group(samples, here, val_fraction if here is None else 0.0, seed)
        train += part_train
        val += part_val
    if named is not None and named - seen_groups:
        raise DataError(f"validation clips not in the data: {', '.join(sorted(named - seen_groups))}")
    return train, val


def split_by_group(samples: Sequence[Sample], val_groups: Optional[Sequence[str]] = None,
                   val_fraction: float = 0.2, seed: int = 0) -> Tuple[List[Sample], List[Sample]]:
    """Train/validation split by clip (group), never by frame.

    ``val_groups`` names the validation clips; otherwise a seeded random ``val_fraction`` of the groups.
    """
    groups = natsorted({s.group for s in samples})
    if val_groups is not None:
        val_set = {str(g) for g in val_groups}
        unknown = sorted(val_set - set(groups))
        if unknown:
            raise DataError(f"validation clips not in the data: {', '.join(unknown)}")
    else:
        count = max(1, round(len(groups) * val_fraction)) if val_fraction > 0 else 0
        val_set = set(random.Random(seed).sample(groups, count))
    train = [s for s in samples if s.group not in val_set]
    val = [s for s in samples if s.group in val_set]
    if not train:
        raise DataError("the validation split leaves no training data")
    return train, val
