"""On-disk cache of frozen-SAM image embeddings, keyed by image content, SAM backend and view."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import numpy as np
import torch


class EmbeddingCache:
    """Stores B x 256 x 64 x 64 SAM embeddings as float16 ``.npy`` files.

    Layout: ``<root>/<sam_id>/<view>/<key[:2]>/<key>.npy`` where ``key`` is the SHA-256 of the
    image's pixels (uint8 H x W x 3) and shape. ``sam_id`` names the backend (and its weights file for
    user-supplied checkpoints), so embeddings of different SAMs never mix.
    """

    def __init__(self, root: str | Path, sam_id: str) -> None:
        self.root = Path(root) / sam_id

    @staticmethod
    def image_key(image: np.ndarray) -> str:
        digest = hashlib.sha256(str(image.shape).encode())
        digest.update(np.ascontiguousarray(image).tobytes())
        return digest.hexdigest()

    def path(self, key: str, view: str) -> Path:
        return self.root / view / key[:2] / f"{key}.npy"

    def has(self, key: str, view: str) -> bool:
        return self.path(key, view).is_file()

    def get(self, key: str, view: str) -> Optional[torch.Tensor]:
        path = self.path(key, view)
        if not path.is_file():
            return None
        return torch.from_numpy(np.load(path))

    def put(self, key: str, view: str, embedding: torch.Tensor) -> None:
        """Write atomically (temp file + rename) so a killed run never leaves a truncated entry."""
        path = self.path(key, view)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".partial.npy")
        np.save(temporary, embedding.detach().to("cpu", torch.float16).numpy())
        temporary.replace(path)


def sam_cache_id(backend: str, checkpoint: Optional[str | Path]) -> str:
    """A cache namespace for a SAM: the backend name, plus the weights file's name and size if user-given."""
    if checkpoint is None:
        return backend
    checkpoint = Path(checkpoint)
    return f"{backend}-{checkpoint.stem}-{checkpoint.stat().st_size}"
