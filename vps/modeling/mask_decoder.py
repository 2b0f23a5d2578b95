"""SAM's mask decoder, batched over images with one prompt each."""

from __future__ import annotations

from typing import List, Tuple

import torch
from segment_anything.modeling import MaskDecoder


class BatchedMaskDecoder(MaskDecoder):
    """segment-anything's ``MaskDecoder`` for B images with one prompt per image.

    The original ``predict_masks`` repeats every image embedding once per prompt
    (``repeat_interleave(image_embeddings, num_prompts)``), which is right for one image with many
    prompts but gives B*B rows for B images with B prompts, and fails when the dense prompts are
    added. Here row i of the image embeddings meets row i of the prompts. The parameters and the
    state-dict keys are those of ``MaskDecoder``, so SAM and LiteMedSAM checkpoints load unchanged.
    """

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Arguments:
          image_embeddings: B x C x h x w (C = transformer_dim, h = w = 64 for SAM).
          image_pe: 1 x C x h x w positional encoding, shared by all images.
          sparse_prompt_embeddings: B x N x C (N may be 0).
          dense_prompt_embeddings: B x C x h x w.
        Returns:
          masks: B x (1 + num_multimask_outputs) x 4h x 4w logits; iou_pred: B x (1 + num_multimask_outputs).
        """
        batch = image_embeddings.shape[0]
        if sparse_prompt_embeddings.shape[0] != batch or dense_prompt_embeddings.shape[0] != batch:
            raise ValueError(
                f"expected one prompt per image: {batch} images, {sparse_prompt_embeddings.shape[0]} sparse "
                f"and {dense_prompt_embeddings.shape[0]} dense prompts"
            )
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(batch, -1, -1)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings.to(output_tokens.dtype)), dim=1)

        src = image_embeddings + dense_prompt_embeddings
        pos_src = image_pe.expand(batch, -1, -1, -1)
        b, c, h, w = src.shape

        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : (1 + self.num_mask_tokens), :]

        src = src.transpose(1, 2).reshape(b, c, h, w)
        upscaled_embedding = self.output_upscaling(src)
        hyper_in_list: List[torch.Tensor] = [
            mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)
        ]
        hyper_in = torch.stack(hyper_in_list, dim=1)
        b, c, h, w = upscaled_embedding.shape
        masks = (hyper_in @ upscaled_embedding.view(b, c, h * w)).view(b, -1, h, w)
        iou_pred = self.iou_prediction_head(iou_token_out)
        return masks, iou_pred
