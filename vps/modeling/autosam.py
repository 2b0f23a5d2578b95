"""AutoSAM (g + frozen SAM) and the light model (g + h): frames in, mask logits out."""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from vps.modeling.embedding_prompt import EmbeddingPromptHead
from vps.modeling.prompt_generator import PromptGenerator
from vps.modeling.prompts import largest_component_boxes
from vps.modeling.sam import FrozenSam
from vps.modeling.surrogate import SurrogateDecoder

# box refinement: components of the first mask refined per image (the largest; a model's stray speckle must not
# cost hundreds of decoder passes), and box prompts decoded per call
REFINED_COMPONENTS = 4
REFINED_MIN_AREA = 32  # pixels of the 256 x 256 first mask (0.05 %): smaller specks are not refined
BOX_CHUNK = 64


def mirror_mean(network: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
    """The mean of ``network`` on ``inputs`` and on their left-right mirror images (that output mirrored back), in
    one batch: AutoSAM's flip TTA."""
    direct, mirrored = network(torch.cat([inputs, inputs.flip(-1)])).chunk(2)
    return (direct + mirrored.flip(-1)) / 2


def upsample_logits(logits: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """B x K x h x w -> B x K x size, bilinear."""
    if logits.shape[-2:] == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


class AutoSAM(nn.Module):
    """SAM with its prompt encoder replaced by a trained prompt generator g (Shaharabany et al., 2023).

    The sparse prompt is empty, g's output is the dense prompt, SAM gives a single mask. SAM is
    frozen; only g has trainable parameters.

    ``box_refinement``: SAM's mask decoder runs a second time on the same image embedding, prompted the way
    LiteMedSAM was trained: with the bounding box of each connected component of the first mask (pixels above
    0.5; the ``REFINED_COMPONENTS`` largest with at least ``REFINED_MIN_AREA`` pixels), one prompt per component,
    the masks united; the output is the mean of the two passes' logits. An image with no such component keeps its
    first pass. Inference only: g is trained on the first pass.

    ``flip_tta``: the dense prompt is the mean of g on the images and on their mirror images (left-right), the
    second mirrored back; SAM's encoder still runs once. Inference only, like the box refinement.

    ``embedding_prompt``: a second prompt generator on SAM's image embedding (``EmbeddingPromptHead``); the dense
    prompt becomes ``(1 - embedding_prompt_weight) * g's + embedding_prompt_weight * its``. With ``flip_tta`` the
    head's prompt is also averaged with its prompt for the mirrored embedding, mirrored back (the embedding is
    mirrored, not re-encoded: the encoder still runs once).
    """

    def __init__(self, sam: FrozenSam, prompt_generator: PromptGenerator, box_refinement: bool = False,
                 flip_tta: bool = False, embedding_prompt: Optional[EmbeddingPromptHead] = None,
                 embedding_prompt_weight: float = 0.0) -> None:
        super().__init__()
        if embedding_prompt is not None and not 0 < embedding_prompt_weight <= 1:
            raise ValueError(f"embedding_prompt_weight must be in (0, 1], got {embedding_prompt_weight}")
        self.sam = sam
        self.prompt_generator = prompt_generator
        self.box_refinement = box_refinement
        self.flip_tta = flip_tta
        self.embedding_prompt = embedding_prompt
        self.embedding_prompt_weight = float(embedding_prompt_weight) if embedding_prompt is not None else 0.0

    def low_res_logits(self, images: torch.Tensor, image_embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Arguments:
          images: B x 3 x H x W in [0, 1].
          image_embeddings: optional precomputed SAM embeddings B x 256 x 64 x 64 (the training cache).
        Returns:
          B x 1 x 256 x 256 mask logits.
        """
        logits, image_embeddings = self.first_pass(images, image_embeddings)
        return self.refine_with_boxes(image_embeddings, logits) if self.box_refinement else logits

    def first_pass(self, images: torch.Tensor, image_embeddings: Optional[torch.Tensor] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
        """g's dense prompt (mixed with the embedding prompt head's, when there is one) into SAM:
        (B x 1 x 256 x 256 mask logits, B x 256 x 64 x 64 image embeddings)."""
        if image_embeddings is None:
            image_embeddings = self.sam.encode(images)
        prompt = self.dense_prompt(images)
        image_embeddings = image_embeddings.to(prompt.dtype)
        if self.embedding_prompt is not None:
            weight = self.embedding_prompt_weight
            prompt = (1 - weight) * prompt + weight * self.embedding_dense_prompt(image_embeddings).to(prompt.dtype)
        return self.sam.decode(image_embeddings, prompt), image_embeddings

    def embedding_dense_prompt(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """B x 256 x 64 x 64 image embeddings -> B x 256 x 64 x 64: the embedding prompt head's prompt, with
        ``flip_tta`` averaged with its prompt for the mirrored embeddings (mirrored back), in one batch."""
        if not self.flip_tta:
            return self.embedding_prompt(image_embeddings)
        return mirror_mean(self.embedding_prompt, image_embeddings)

    def dense_prompt(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W in [0, 1] -> B x 256 x 64 x 64: g's prompt, or with ``flip_tta`` the mean of g's prompts for
        the images and their mirror images (mirrored back), in one batch."""
        if not self.flip_tta:
            return self.prompt_generator(images)
        return mirror_mean(self.prompt_generator, images)

    def refine_with_boxes(self, image_embeddings: torch.Tensor, logits: torch.Tensor,
                          decode_boxes: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None
                          ) -> torch.Tensor:
        """The box refinement (class docstring) of first-pass logits.

        Arguments:
          image_embeddings: B x 256 x 64 x 64.
          logits: B x 1 x 256 x 256 first-pass mask logits.
          decode_boxes: N x 256 x 64 x 64 embeddings, N x 4 boxes -> N x 1 x 256 x 256 logits; default SAM's
            ``decode_with_prompts`` (an exported backend passes its compiled decoder).
        Returns:
          B x 1 x 256 x 256 logits, float32.
        """
        decode_boxes = decode_boxes or (lambda embeddings, boxes: self.sam.decode_with_prompts(embeddings, boxes=boxes))
        logits = logits.float()
        masks = (logits[:, 0] > 0).cpu().numpy()
        boxes = [largest_component_boxes(mask, self.sam.image_size, REFINED_COMPONENTS, REFINED_MIN_AREA) for mask in masks]
        owners = torch.cat([torch.full((len(b),), i, dtype=torch.int64) for i, b in enumerate(boxes)]).to(logits.device)
        if len(owners) == 0:
            return logits
        boxes = torch.cat(boxes).to(logits.device)
        boxed = torch.cat([decode_boxes(image_embeddings[owners[start:start + BOX_CHUNK]],
                                        boxes[start:start + BOX_CHUNK]).float()
                           for start in range(0, len(boxes), BOX_CHUNK)])
        united = torch.full_like(logits, float("-inf")).scatter_reduce_(
            0, owners[:, None, None, None].expand_as(boxed), boxed, "amax")
        found = torch.zeros(len(logits), dtype=torch.bool, device=logits.device).index_fill_(0, owners, True)
        return torch.where(found[:, None, None, None], (logits + united) / 2, logits)

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
