"""A second prompt generator that looks at SAM's own image embedding instead of the image."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class EmbeddingPromptHead(nn.Module):
    """SAM's frozen image embedding in, a dense prompt for SAM's mask decoder out (the prompt-free heads of Hu et
    al., 2023, on the frozen encoder, but giving a dense prompt like AutoSAM's g instead of a mask).

    AutoSAM mixes its prompt with g's (``AutoSAM.embedding_prompt``): the two see different inputs (g an
    ImageNet backbone on the frame, this head SAM's encoder) and err in different places, so the mixed prompt is
    better than either. It is trained alone, through SAM's frozen decoder, from cached embeddings: an epoch costs
    no image encoder at all.

    Layers: a 1x1 convolution to ``hidden_channels``, one 3x3 convolution per entry of ``dilations`` (dilated,
    so that the last ones see most of the 64 x 64 grid), each followed by GroupNorm and GELU, then a 1x1
    convolution back to ``embed_dim`` and tanh (g's prompts are in [-1, 1] too).
    """

    def __init__(self, embed_dim: int = 256, hidden_channels: int = 128, dilations: Sequence[int] = (1, 2, 4, 8),
                 groups: int = 8) -> None:
        """
        Arguments:
          embed_dim: C, the channels of SAM's embedding and of the prompt (256).
          hidden_channels: the width of the convolutions in between.
          dilations: one 3x3 convolution per entry, with that dilation.
          groups: GroupNorm's groups (must divide ``hidden_channels``).
        """
        super().__init__()
        if hidden_channels % groups:
            raise ValueError(f"hidden_channels {hidden_channels} is not a multiple of GroupNorm's {groups} groups")
        layers = [nn.Conv2d(embed_dim, hidden_channels, 1), nn.GroupNorm(groups, hidden_channels), nn.GELU()]
        for dilation in dilations:
            layers += [nn.Conv2d(hidden_channels, hidden_channels, 3, padding=int(dilation), dilation=int(dilation)),
                       nn.GroupNorm(groups, hidden_channels), nn.GELU()]
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(hidden_channels, embed_dim, 1)

    def forward(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """B x C x h x w SAM image embeddings (64 x 64) -> B x C x h x w dense prompt in [-1, 1]."""
        return torch.tanh(self.out(self.body(image_embeddings)))
