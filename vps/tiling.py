"""Tiled inference for stills larger than the model's input: overlapping tiles, blended with linear ramps.

The models resize every image to a fixed square (256 x 256 for LiteMedSAM), so in a 1000 x 1000
histology tile a nucleus of a few dozen pixels shrinks to a few. Here the image is cut into overlapping
``tile`` x ``tile`` windows, each window is segmented on its own (resized to the model's input, so objects
keep about their size), and the windows' logits are blended back: each window's weight rises linearly
from its edges over the overlap, so seams fade out and every pixel is a weighted mean of the windows
that hold it. An image no larger than one tile is one window: the same as untiled inference.
"""

from __future__ import annotations

from typing import Callable, List

import torch
import torch.nn.functional as F

DEFAULT_OVERLAP = 0.25  # the share of a tile's side that neighbouring tiles share


def tile_starts(length: int, tile: int, overlap: int) -> List[int]:
    """Start offsets of windows of side ``tile`` covering 0..length with at least ``overlap`` pixels shared;
    the last window ends at ``length``. One window (start 0) when ``length <= tile``."""
    if length <= tile:
        return [0]
    stride = max(1, tile - overlap)
    count = -(-(length - tile) // stride) + 1  # ceil: enough windows to reach the end
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def ramp_weights(height: int, width: int, overlap: int) -> torch.Tensor:
    """height x width blending weights: 1 inside, falling linearly to 1 / (overlap + 1) at the window's edges."""

    def ramp(length: int) -> torch.Tensor:
        position = torch.arange(length, dtype=torch.float32)
        distance = torch.minimum(position, length - 1 - position) + 1  # 1 at the edge pixels
        return (distance / (overlap + 1)).clamp(max=1.0) if overlap > 0 else torch.ones(length)

    return ramp(height)[:, None] * ramp(width)[None, :]


def tiled_logits(predict: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, tile: int,
                 overlap: float = DEFAULT_OVERLAP, batch_size: int = 8) -> torch.Tensor:
    """Segment a large image window by window and blend the windows' logits.

    Arguments:
      predict: B x 3 x t x t images -> B x K x h x w logits at any resolution (resized to t x t here), e.g. a
        model that resizes its input to its own square.
      image: 3 x H x W (or 1 x 3 x H x W) in [0, 1].
      tile: window side t in the image's pixels; a side of the image shorter than ``tile`` is one window.
      overlap: the share of ``tile`` that neighbouring windows overlap (and over which weights ramp).
      batch_size: windows per ``predict`` call.
    Returns:
      1 x K x H x W float32 logits.
    """
    if tile < 1:
        raise ValueError(f"tile must be at least 1 pixel, got {tile}")
    if not 0 <= overlap < 1:
        raise ValueError(f"tile overlap must be in [0, 1), got {overlap}")
    image = image if image.dim() == 4 else image[None]
    height, width = image.shape[-2:]
    tile_h, tile_w = min(tile, height), min(tile, width)
    shared = int(round(overlap * tile))
    boxes = [(top, left) for top in tile_starts(height, tile_h, shared) for left in tile_starts(width, tile_w, shared)]
    weights = ramp_weights(tile_h, tile_w, shared).to(image.device)
    total = torch.zeros(height, width, device=image.device)
    blended = None
    for start in range(0, len(boxes), batch_size):
        chunk = boxes[start:start + batch_size]
        windows = torch.cat([image[..., top:top + tile_h, left:left + tile_w] for top, left in chunk])
        logits = predict(windows).float()
        if logits.shape[-2:] != (tile_h, tile_w):
            logits = F.interpolate(logits, size=(tile_h, tile_w), mode="bilinear", align_corners=False)
        if blended is None:
            blended = torch.zeros(logits.shape[1], height, width, device=image.device)
        for (top, left), window in zip(chunk, logits):
            blended[:, top:top + tile_h, left:left + tile_w] += window * weights
            total[top:top + tile_h, left:left + tile_w] += weights
    return (blended / total)[None]
