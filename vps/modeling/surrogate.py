"""The surrogate decoder h: decodes g's dense prompt straight to a mask, without SAM."""

from __future__ import annotations

import torch
from torch import nn


class SurrogateDecoder(nn.Module):
    """h: B x 256 x 64 x 64 prompt -> B x 1 x 256 x 256 mask logits, two transposed convolutions."""

    def __init__(self, embed_dim: int = 256, hidden_channels: int = 64) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.ConvTranspose2d(embed_dim, hidden_channels, kernel_size=2, stride=2),
            nn.BatchNorm2d(hidden_channels),
            nn.GELU(),
            nn.ConvTranspose2d(hidden_channels, 1, kernel_size=2, stride=2),
        )

    def forward(self, prompt: torch.Tensor) -> torch.Tensor:
        return self.layers(prompt)
