"""Prompt-free heads on the frozen SAM image embedding (Hu et al., 2023), and the model that runs them.

Each head maps SAM's image embedding B x 256 x h x w (64 x 64 for LiteMedSAM and SAM ViT) to K mask
logits B x K x 4h x 4w (SAM's 256 x 256 low-resolution masks), with no prompt at all:

- ``PromptFreeMaskDecoder`` (the ViT head): SAM's mask decoder without prompt tokens, one copy of its
  output tokens per class, initialised from SAM's trained decoder;
- ``ConvHead`` (the CNN head): convolutions and two 2x transposed-convolution upsamplings;
- ``LinearHead``: a 1 x 1 convolution, upsampled bilinearly.

``PromptFreeSam`` puts a head behind the frozen image encoder: frames in, K mask logits out.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from vps.modeling.autosam import upsample_logits
from vps.modeling.sam import FrozenSam

MASK_UPSCALE = 4  # SAM's masks are 4x the embedding's side (256 for a 64 x 64 embedding)


class PromptFreeMaskDecoder(nn.Module):
    """SAM's mask decoder with the prompt tokens removed: only output tokens, one set per class.

    SAM's decoder attends from its output tokens (an IoU token and four mask tokens) and the prompt
    tokens to the image embedding. Here there are no prompt tokens and no dense prompt; each class k has
    its own copy of the output tokens, and the image embedding is repeated once per class (the batch
    becomes B*K rows, Hu et al. 2023, figure 3), so one pass gives one mask per class. Class k's mask
    comes from its first mask token, as SAM's single-mask output does. The IoU token only takes part in
    attention (there is no IoU head: nothing would train it).
    """

    def __init__(
        self,
        transformer: nn.Module,
        output_upscaling: nn.Module,
        output_hypernetwork: nn.Module,
        output_tokens: torch.Tensor,
        image_pe: torch.Tensor,
        num_classes: int,
    ) -> None:
        """
        Arguments:
          transformer: SAM's TwoWayTransformer (trained with the head).
          output_upscaling: SAM's 4x upscaling of the image embedding, C -> C/8 channels.
          output_hypernetwork: SAM's MLP that maps the first mask token to C/8 mask weights.
          output_tokens: T x C initial output tokens (SAM's IoU token and mask tokens); every class starts
            from them.
          image_pe: 1 x C x h x w dense positional encoding (SAM's ``prompt_encoder.get_dense_pe()``); a
            fixed buffer, not saved in checkpoints (it is rebuilt from SAM).
          num_classes: K, the number of masks per image.
        """
        super().__init__()
        self.transformer = transformer
        self.output_upscaling = output_upscaling
        self.output_hypernetwork = output_hypernetwork
        self.num_classes = num_classes
        self.class_tokens = nn.Parameter(output_tokens.detach().clone()[None].repeat(num_classes, 1, 1))
        self.register_buffer("image_pe", image_pe.detach().clone(), persistent=False)

    def forward(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """B x C x h x w image embeddings -> B x K x 4h x 4w mask logits."""
        batch, channels, height, width = image_embeddings.shape
        classes = self.num_classes
        src = image_embeddings.repeat_interleave(classes, dim=0)  # row b * K + k: image b for class k
        tokens = self.class_tokens.repeat(batch, 1, 1).to(src.dtype)
        pos_src = self.image_pe.to(src.dtype).expand(batch * classes, -1, -1, -1)
        hs, src = self.transformer(src, pos_src, tokens)
        mask_weights = self.output_hypernetwork(hs[:, 1, :])  # the first mask token: SAM's single mask
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(batch * classes, channels, height, width))
        masks = (mask_weights[:, None, :] @ upscaled.flatten(2)).view(batch, classes, *upscaled.shape[-2:])
        return masks


class ConvHead(nn.Module):
    """The CNN head: B x C x h x w -> B x K x 4h x 4w.

    A 1 x 1 convolution to ``4 * hidden_channels`` channels, then twice a 3 x 3 convolution (BatchNorm,
    ReLU) and a 2x transposed convolution that halves the channels, then a 3 x 3 convolution and a 1 x 1
    convolution to K logits.
    """

    def __init__(self, embed_dim: int = 256, num_classes: int = 1, hidden_channels: int = 64) -> None:
        super().__init__()
        channels = hidden_channels * MASK_UPSCALE
        layers = [nn.Conv2d(embed_dim, channels, kernel_size=1), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        for _ in range(2):  # 2x twice: MASK_UPSCALE
            layers += [nn.Conv2d(channels, channels, kernel_size=3, padding=1), nn.BatchNorm2d(channels),
                       nn.ReLU(inplace=True), nn.ConvTranspose2d(channels, channels // 2, kernel_size=2, stride=2)]
            channels //= 2
        layers += [nn.Conv2d(channels, channels, kernel_size=3, padding=1), nn.ReLU(inplace=True),
                   nn.Conv2d(channels, num_classes, kernel_size=1)]
        self.layers = nn.Sequential(*layers)
        self.num_classes = num_classes

    def forward(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """B x C x h x w -> B x K x 4h x 4w logits."""
        return self.layers(image_embeddings)


class LinearHead(nn.Module):
    """The linear head: a 1 x 1 convolution on the embedding, upsampled bilinearly: B x C x h x w -> B x K x 4h x 4w."""

    def __init__(self, embed_dim: int = 256, num_classes: int = 1, upscale: int = MASK_UPSCALE) -> None:
        super().__init__()
        self.classifier = nn.Conv2d(embed_dim, num_classes, kernel_size=1)
        self.upscale = upscale
        self.num_classes = num_classes

    def forward(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(image_embeddings)
        return F.interpolate(logits, scale_factor=self.upscale, mode="bilinear", align_corners=False)


class PromptFreeSam(nn.Module):
    """Frozen SAM image encoder + a trained prompt-free head (no prompt generator, no prompt).

    Only the head has trainable parameters; SAM stays frozen (see FrozenSam). ``class_names`` name the
    K output channels (for output folders); ``None`` for one unnamed class.
    """

    def __init__(self, sam: FrozenSam, head: nn.Module, class_names: Optional[Sequence[str]] = None) -> None:
        super().__init__()
        self.sam = sam
        self.head = head
        self.class_names: Tuple[str, ...] = tuple(class_names or ())

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def low_res_logits(self, images: torch.Tensor, image_embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Arguments:
          images: B x 3 x H x W in [0, 1] (only encoded when ``image_embeddings`` is None).
          image_embeddings: optional precomputed SAM embeddings B x 256 x 64 x 64.
        Returns:
          B x K x 256 x 256 mask logits.
        """
        if image_embeddings is None:
            image_embeddings = self.sam.encode(images)
        return self.head(image_embeddings)

    def forward(self, images: torch.Tensor, output_size: Optional[Tuple[int, int]] = None,
                image_embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
        """B x 3 x H x W in [0, 1] -> B x K x H x W mask logits (or ``output_size``)."""
        return upsample_logits(self.low_res_logits(images, image_embeddings), output_size or images.shape[-2:])
