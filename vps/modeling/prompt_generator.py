"""The prompt generator g: an image in, SAM's dense prompt embedding out."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ConvBlock(nn.Sequential):
    """Two 3x3 conv + BatchNorm + ReLU layers: B x in x H x W -> B x out x H x W."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class SkipDecoder(nn.Module):
    """U-Net style decoder from a feature pyramid to the dense prompt.

    Starts at the coarsest feature map, and for each finer one upsamples by 2, concatenates the skip
    connection and applies a ConvBlock; a 1x1 projection and tanh (as in AutoSAM) give the prompt.
    """

    def __init__(self, feature_channels: Sequence[int], decoder_channels: Sequence[int], embed_dim: int) -> None:
        """
        Arguments:
          feature_channels: channels of the backbone features, finest first (e.g. strides 4, 8, 16, 32).
          decoder_channels: output channels of each decoder stage, coarse to fine; one fewer than features.
          embed_dim: channels of the prompt (256 for SAM).
        """
        super().__init__()
        if len(decoder_channels) != len(feature_channels) - 1:
            raise ValueError(f"{len(feature_channels)} feature levels need {len(feature_channels) - 1} "
                             f"decoder stages, got {len(decoder_channels)}")
        skips = list(feature_channels[:-1])[::-1]
        in_channels = feature_channels[-1]
        self.stages = nn.ModuleList()
        for skip, out in zip(skips, decoder_channels):
            self.stages.append(ConvBlock(in_channels + skip, out))
            in_channels = out
        self.project = nn.Conv2d(in_channels, embed_dim, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """features: finest first, each B x C_i x H_i x W_i. Returns B x embed_dim x H_0 x W_0 in (-1, 1)."""
        x = features[-1]
        for stage, skip in zip(self.stages, reversed(features[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = stage(torch.cat([x, skip], dim=1))
        return torch.tanh(self.project(x))


class PromptGenerator(nn.Module):
    """g: B x 3 x H x W image in [0, 1] -> B x 256 x 64 x 64 dense prompt for SAM's mask decoder."""

    def __init__(
        self,
        backbone: nn.Module,
        decoder: SkipDecoder,
        input_size: int,
        embedding_size: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
    ) -> None:
        """
        Arguments:
          backbone: returns a list of feature maps, finest first (timm ``features_only``).
          decoder: turns those features into the prompt.
          input_size: g resizes its input to input_size x input_size (AutoSAM uses 256).
          embedding_size: side of SAM's image embedding (64); the prompt is resized to it if needed.
          pixel_mean, pixel_std: the backbone's normalisation for images in [0, 1].
        """
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder
        self.input_size = input_size
        self.embedding_size = embedding_size
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(1, 3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(1, 3, 1, 1), False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W in [0, 1] -> B x 3 x input_size x input_size, normalised."""
        if images.shape[-2:] != (self.input_size, self.input_size):
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        return (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        prompt = self.decoder(self.backbone(self.preprocess(images)))
        if prompt.shape[-1] != self.embedding_size:
            prompt = F.interpolate(prompt, size=(self.embedding_size, self.embedding_size), mode="bilinear",
                                   align_corners=False)
        return prompt
