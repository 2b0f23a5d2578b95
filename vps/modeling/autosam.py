"""AutoSAM (g + frozen SAM) and the light model (g + h): frames in, mask logits out."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from vps.modeling.prompt_generator import PromptGenerator
from vps.modeling.sam import FrozenSam
from vps.modeling.surrogate import SurrogateDecoder


def upsample_logits(logits: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """B x K x h x w -> B x K x size, bilinear."""
    if logits.shape[-2:] == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


class AutoSAM(nn.Module):
    """SAM with its prompt encoder replaced by a trained prompt generator g (Shaharabany et al., 2023).

    The sparse prompt is empty, g's output is the dense prompt, SAM gives a single mask. SAM is
    frozen; only g has trainable parameters.
    """

    def __init__(self, sam: FrozenSam, prompt_generator: PromptGenerator) -> None:
        super().__init__()
        self.sam = sam
        self.prompt_generator = prompt_generator

    def low_res_logits(self, images: torch.Tensor, image_embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Arguments:
          images: B x 3 x H x W in [0, 1].
          image_embeddings: optional precomputed SAM embeddings B x 256 x 64 x 64 (the training cache).
        Returns:
          B x 1 x 256 x 256 mask logits.
        """
        if image_embeddings is None:
            image_embeddings = self.sam.encode(images)
        prompt = self.prompt_generator(images)
        return self.sam.decode(image_embeddings.to(prompt.dtype), prompt)

    def forward(self, images: torch.Tensor, output_size: Optional[Tuple[int, int]] = None,
                image_embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
        """B x 3 x H x W in [0, 1] -> B x 1 x H x W mask logits (or ``output_size``)."""
        logits = self.low_res_logits(images, image_embeddings)
        return upsample_logits(logits, output_size or images.shape[-2:])


class LightModel(nn.Module):
    """The light model h(g(I)): the prompt generator decoded by the surrogate decoder, no SAM."""

    def __init__(self, prompt_generator: PromptGenerator, surrogate: SurrogateDecoder) -> None:
        super().__init__()
        self.prompt_generator = prompt_generator
        self.surrogate = surrogate

    def low_res_logits(self, images: torch.Tensor, image_embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
        """B x 3 x H x W in [0, 1] -> B x 1 x 256 x 256 logits (``image_embeddings`` is ignored)."""
        return self.surrogate(self.prompt_generator(images))

    def forward(self, images: torch.Tensor, output_size: Optional[Tuple[int, int]] = None,
                image_embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
        """B x 3 x H x W in [0, 1] -> B x 1 x H x W mask logits (or ``output_size``)."""
        return upsample_logits(self.low_res_logits(images), output_size or images.shape[-2:])
