"""Augmentation from config: cached geometric views, photometric jitter, exact geometric transforms.

With the embedding cache, SAM's embedding of every (image, view) pair is computed once, so the
geometric augmentation is restricted to the cached views (flips, 90-degree rotations) and the
photometric augmentation reaches g's input only. Without the cache, the full recipe (flips, affine
rotation and scale, colour jitter) is applied to the image that both g and SAM see.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torchvision.transforms.v2 as T
from torchvision import tv_tensors

# Where a training batch is augmented (runtime.augment_on; vps.train.trainer.augments_on_device)
AUGMENT_ON = ("auto", "loader", "device")

# A view acts on the last two axes (H, W) of a tensor; all keep a square image square.
VIEWS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "hflip": lambda x: x.flip(-1),
    "vflip": lambda x: x.flip(-2),
    "rot90": lambda x: x.rot90(1, (-2, -1)),
    "rot180": lambda x: x.rot90(2, (-2, -1)),
    "rot270": lambda x: x.rot90(3, (-2, -1)),
    "transpose": lambda x: x.transpose(-2, -1),
    "antitranspose": lambda x: x.rot90(2, (-2, -1)).transpose(-2, -1),
}


def apply_view(tensor: torch.Tensor, view: str) -> torch.Tensor:
    if view not in VIEWS:
        raise ValueError(f"unknown view '{view}'; expected one of {', '.join(VIEWS)}")
    return VIEWS[view](tensor).contiguous()


def build_photometric(config: Optional[Dict[str, Any]]) -> Optional[T.Transform]:
    """Colour jitter for images in [0, 1] (C x H x W float), or None when not configured."""
    jitter = (config or {}).get("color_jitter")
    if not jitter:
        return None
    return T.ColorJitter(**jitter)


def build_geometric(config: Optional[Dict[str, Any]]) -> Optional[T.Transform]:
    """Joint image/mask flips and affine (rotation, scale), used when the embedding cache is off."""
    config = config or {}
    steps = []
    if config.get("hflip", False):
        steps.append(T.RandomHorizontalFlip())
    if config.get("vflip", False):
        steps.append(T.RandomVerticalFlip())
    if config.get("rotate", 0) or config.get("scale"):
        scale = config.get("scale")
        steps.append(T.RandomAffine(degrees=float(config.get("rotate", 0)), scale=tuple(scale) if scale else None))
    return T.Compose(steps) if steps else None


def geometric_pair(transform: T.Transform, image: torch.Tensor, mask: torch.Tensor):
    """Apply one random geometric draw to an image (3 x H x W) and its mask (K x h x w) together.

    torchvision transforms one sample at one size; a mask of another size than the image (g's input larger than
    the loss's mask) gets the same draw by replaying the random state (the draws do not depend on the size)."""
    if mask.shape[-2:] == image.shape[-2:]:
        image_out, mask_out = transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
    else:
        state = torch.get_rng_state()
        image_out = transform(tv_tensors.Image(image))
        torch.set_rng_state(state)
        mask_out = transform(tv_tensors.Mask(mask))
    return image_out.as_subclass(torch.Tensor), mask_out.as_subclass(torch.Tensor)


class BatchAugment:
    """The dataset's augmentation applied to a batch where the batch is (the GPU): each sample gets its own random
    draw of the same torchvision transforms, in the same order (geometry on image and mask, then colour on the
    image), so the recipe is the one the DataLoader's workers apply; only where it runs changes
    (``runtime.augment_on``)."""

    def __init__(self, geometric: Optional[T.Transform], photometric: Optional[T.Transform]) -> None:
        self.geometric = geometric
        self.photometric = photometric

    def __call__(self, images: torch.Tensor, masks: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """images B x 3 x S x S in [0, 1], masks B x K x M x M -> both augmented, same shapes."""
        if self.geometric is None and self.photometric is None:
            return images, masks
        image_out, mask_out = [], []
        for image, mask in zip(images, masks):
            if self.geometric is not None:
                image, mask = geometric_pair(self.geometric, image, mask)
            if self.photometric is not None:
                image = self.photometric(image)
            image_out.append(image.clamp(0, 1))
            mask_out.append(mask)
        return torch.stack(image_out), torch.stack(mask_out)
