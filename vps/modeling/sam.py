"""Frozen SAM backends behind one interface: encode images, decode with a dense prompt."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def _refresh_after_load(module: nn.Module, incompatible_keys) -> None:
    module.train(False)


class FrozenSam(nn.Module):
    """A Segment Anything model used as a fixed feature extractor and mask decoder.

    Every parameter is frozen and the module stays in eval mode whatever ``train()`` is asked, so
    BatchNorm statistics (TinyViT) never move while the prompt generator trains. Gradients still
    flow *through* the mask decoder to its dense-prompt input.
    """

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: nn.Module,
        mask_decoder: nn.Module,
        image_size: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        backend: str,
    ) -> None:
        """
        Arguments:
          image_encoder: maps B x 3 x image_size x image_size to B x 256 x 64 x 64.
          prompt_encoder: SAM's PromptEncoder (its positional encoding and no-point embeddings are used).
          mask_decoder: a BatchedMaskDecoder.
          image_size: the square input side the encoder expects (256 LiteMedSAM, 1024 SAM ViT).
          pixel_mean, pixel_std: per-channel normalisation applied to images in [0, 1].
          backend: name recorded in checkpoints of models trained on this SAM.
        """
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.image_size = image_size
        self.backend = backend
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(1, 3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(1, 3, 1, 1), False)
        self.requires_grad_(False)
        self.eval()
        # Loading weights must refresh caches derived from them: TinyViT's attention layers keep the
        # table ``ab = attention_biases[:, idxs]``, computed when eval() is called, i.e. above, from the
        # random initial biases. Without this, LiteMedSAM would run with stale (zero) attention biases.
        self.register_load_state_dict_post_hook(_refresh_after_load)

    def train(self, mode: bool = True) -> "FrozenSam":
        return super().train(False)

    @property
    def embedding_shape(self) -> Tuple[int, int, int]:
        """(C, h, w) of the image embedding, e.g. (256, 64, 64)."""
        h, w = self.prompt_encoder.image_embedding_size
        return (self.prompt_encoder.embed_dim, h, w)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W in [0, 1] -> B x 3 x S x S, resized (no padding) and normalised."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        return (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W in [0, 1] -> image embeddings B x 256 x 64 x 64, without autograd."""
        return self.image_encoder(self.preprocess(images))

    def decode(self, image_embeddings: torch.Tensor, dense_prompt: torch.Tensor) -> torch.Tensor:
        """Mask logits from image embeddings and a dense prompt, with an empty sparse prompt.

        Arguments:
          image_embeddings: B x 256 x 64 x 64.
          dense_prompt: B x 256 x 64 x 64 (the prompt generator's output).
        Returns:
          B x 1 x 256 x 256 low-resolution mask logits (single-mask output).
        """
        batch = image_embeddings.shape[0]
        sparse = torch.empty(batch, 0, self.prompt_encoder.embed_dim, device=image_embeddings.device,
                             dtype=dense_prompt.dtype)
        low_res_masks, _ = self.mask_decoder(
            image_embeddings=image_embeddings,
            image_pe=self.prompt_encoder.get_dense_pe().to(image_embeddings.dtype),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense_prompt.to(image_embeddings.dtype),
            multimask_output=False,
        )
        return low_res_masks

    def decode_with_boxes(self, image_embeddings: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """SAM's own box-prompted decoding (the reference the prompt generator replaces).

        Arguments:
          image_embeddings: B x 256 x 64 x 64.
          boxes: B x 4 boxes (x0, y0, x1, y1) in the encoder's input pixels (0..image_size).
        Returns:
          B x 1 x 256 x 256 low-resolution mask logits.
        """
        return self.decode_with_prompts(image_embeddings, boxes=boxes)

    def decode_with_prompts(
        self,
        image_embeddings: torch.Tensor,
        points: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        boxes: Optional[torch.Tensor] = None,
        mask_inputs: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """SAM prompted as SAM is: points, a box and/or a low-resolution mask per image (vps/modeling/prompts.py
        builds them from a known mask). At least one prompt must be given.

        Arguments:
          image_embeddings: B x 256 x 64 x 64.
          points: (B x N x 2 coordinates (x, y) in the encoder's input pixels, B x N labels: 1 foreground,
            0 background, -1 padding).
          boxes: B x 4 boxes (x0, y0, x1, y1) in the encoder's input pixels.
          mask_inputs: B x 1 x 256 x 256 mask logits (SAM's low-resolution mask prompt, e.g. a previous output).
        Returns:
          B x 1 x 256 x 256 low-resolution mask logits (single-mask output).
        """
        if points is None and boxes is None and mask_inputs is None:
            raise ValueError("decode_with_prompts needs points, boxes or mask_inputs")
        dtype = image_embeddings.dtype
        sparse, dense = self.prompt_encoder(
            points=None if points is None else (points[0].to(dtype), points[1]),
            boxes=None if boxes is None else boxes[:, None, :].to(dtype),
            masks=None if mask_inputs is None else mask_inputs.to(dtype),
        )
        low_res_masks, _ = self.mask_decoder(
            image_embeddings=image_embeddings,
            image_pe=self.prompt_encoder.get_dense_pe().to(dtype),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense.to(dtype),
            multimask_output=False,
        )
        return low_res_masks
