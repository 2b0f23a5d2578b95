"""Torch datasets for training g (with or without the SAM embedding cache) and h."""

from __future__ import annotations

import random
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from vps.progress import Progress
from vps.train.augment import apply_view, geometric_pair
from vps.train.cache import EmbeddingCache
from vps.train.data import Sample, read_pair


def to_square_tensor(image: np.ndarray, size: int) -> torch.Tensor:
    """H x W x 3 uint8 -> 3 x size x size float in [0, 1] (bilinear, antialiased)."""
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255.0
    return F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def to_square_uint8(image: np.ndarray, size: int) -> torch.Tensor:
    """H x W x 3 uint8 -> 3 x size x size uint8: what the dataset keeps in memory (a quarter of float)."""
    return (to_square_tensor(image, size) * 255).round().to(torch.uint8)


def to_square_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    """H x W (or K x H x W, one mask per class) bool -> 1 x size x size (K x size x size) float in {0, 1}
    (area average, then > 0.5)."""
    tensor = torch.from_numpy(mask.astype(np.float32))
    tensor = tensor.reshape(-1, *tensor.shape[-2:])[None]
    return (F.interpolate(tensor, size=(size, size), mode="area") > 0.5).float()[0]


class SegmentationDataset(Dataset):
    """Image/mask pairs resized to squares, with augmentation and optional cached SAM embeddings.

    Items: ``image`` 3 x S x S in [0, 1] (what g sees; SAM sees it too when there is no cache),
    ``mask`` K x M x M in {0, 1} (K = 1 unless there is one mask per class), ``source`` the index of the
    sample's source in ``sources``, and with a cache ``embedding`` 256 x 64 x 64 float16.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        image_size: int,
        mask_size: int = 256,
        cache: Optional[EmbeddingCache] = None,
        views: Sequence[str] = ("identity",),
        photometric=None,
        geometric=None,
        derived_views: Sequence[str] = (),
    ) -> None:
        """
        Arguments (besides the class docstring's):
          views: cached views drawn from, uniformly with ``derived_views``: SAM's embedding of the transformed image.
          derived_views: views whose embedding is the cached identity embedding transformed the same way, not SAM's
            embedding of the transformed image: cheap geometric augmentation, exact for the image and the mask but
            approximate for the embedding (docs/training.md, "Derived views").
        """
        self.samples = list(samples)
        self.image_size = image_size
        self.mask_size = mask_size
        self.cache = cache
        self.views = list(views)
        self.derived_views = [view for view in derived_views if view not in self.views]
        self.photometric = photometric
        self.geometric = geometric
        self.sources = sorted({s.source for s in self.samples})
        self._source_index = {name: i for i, name in enumerate(self.sources)}
        self._decoded: Dict[int, tuple] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int):
        """(key, image 3 x S x S float in [0, 1], mask K x M x M); decoded once per worker and kept as uint8."""
        if index not in self._decoded:
            image, mask = read_pair(self.samples[index])
            self._decoded[index] = (EmbeddingCache.image_key(image), to_square_uint8(image, self.image_size),
                                    to_square_mask(mask, self.mask_size).to(torch.uint8))
        key, image, mask = self._decoded[index]
        return key, image.float() / 255.0, mask.float()

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        item = self._augmented(index)
        item["source"] = self._source_index[self.samples[index].source]
        return item

    @property
    def cached_views(self) -> List[str]:
        """The views this dataset reads from the cache: ``views``, and identity as the derived views' source."""
        return self.views + (["identity"] if self.derived_views and "identity" not in self.views else [])

    def _augmented(self, index: int) -> Dict[str, torch.Tensor]:
        key, image, mask = self.load(index)
        if self.cache is not None:
            view = random.choice(self.views + self.derived_views)
            cached_view = "identity" if view in self.derived_views else view
            embedding = self.cache.get(key, cached_view)
            if embedding is None:
                raise RuntimeError(f"embedding cache has no '{cached_view}' view of {self.samples[index].image}; "
                                   "fill the cache first (fill_cache)")
            if cached_view != view:
                embedding = apply_view(embedding, view)
            image, mask = apply_view(image, view), apply_view(mask, view)
            if self.photometric is not None:
                image = self.photometric(image)
            return {"image": image, "mask": mask, "embedding": embedding}
        if self.geometric is not None:
            image, mask = geometric_pair(self.geometric, image, mask)
        if self.photometric is not None:
            image = self.photometric(image)
        return {"image": image.clamp(0, 1), "mask": mask}


def missing_embeddings(dataset: SegmentationDataset, views: Sequence[str], shard: tuple = (0, 1)
                       ) -> List[Tuple[int, str]]:
    """The (image index, view) pairs of ``dataset`` whose embedding is not in its cache yet.

    ``shard=(rank, world_size)``: this process's share of the images, when distributed processes split the work.
    """
    cache = dataset.cache
    assert cache is not None
    rank, world = shard
    todo: List[Tuple[int, str]] = []
    for index in range(rank, len(dataset), world):
        key, _, _ = dataset.load(index)
        todo += [(index, view) for view in views if not cache.has(key, view)]
    return todo


@torch.no_grad()
def fill_cache(dataset: SegmentationDataset, encode: Callable[[torch.Tensor], torch.Tensor],
               todo: Sequence[Tuple[int, str]], device: torch.device, batch_size: int = 4,
               progress: bool = True) -> int:
    """Compute the embeddings ``todo`` (``missing_embeddings``) with ``encode`` (``sam.encode``, or SAM's encoder
    run by another backend: ``vps.backends.image_encoder``) and store them. Returns how many were computed."""
    cache = dataset.cache
    assert cache is not None
    bar = Progress("SAM embeddings", len(todo), "image", quiet=not progress or not todo, prefix="vps-train")
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        loaded = {index: dataset.load(index) for index in {index for index, _ in chunk}}
        images = torch.stack([apply_view(loaded[i][1], v) for i, v in chunk]).to(device)
        embeddings = encode(images)
        for (index, view), embedding in zip(chunk, embeddings):
            cache.put(loaded[index][0], view, embedding)
        bar.update(len(chunk))
    bar.close()
    return len(todo)
