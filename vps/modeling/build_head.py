"""Builders for the prompt-free heads: a ``model.head`` config (plain dict) and a frozen SAM -> head module."""

from __future__ import annotations

import copy
from typing import Any, Dict, Optional

import torch
from torch import nn

from vps.modeling.heads import ConvHead, LinearHead, PromptFreeMaskDecoder
from vps.modeling.sam import FrozenSam

AUTOSAM_G = "autosam_g"  # AutoSAM: the prompt generator g feeds SAM's decoder (vps/modeling/autosam.py)
# Every head's own settings and their defaults; a config gives ``type`` and may override these.
PROMPT_FREE_HEADS: Dict[str, Dict[str, Any]] = {
    "vit": {},
    "cnn": {"hidden_channels": 64},
    "linear": {},
}
HEAD_TYPES = (AUTOSAM_G, *PROMPT_FREE_HEADS)


def head_settings(head_config: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The full settings of ``model.head``: its type (default ``autosam_g``) and the type's defaults filled in."""
    config = dict(head_config or {})
    kind = config.pop("type", AUTOSAM_G)
    if kind not in HEAD_TYPES:
        raise ValueError(f"unknown head type '{kind}'; expected one of {', '.join(HEAD_TYPES)}")
    if kind == AUTOSAM_G:
        return {"type": kind, **config}
    unknown = sorted(set(config) - set(PROMPT_FREE_HEADS[kind]))
    if unknown:
        raise ValueError(f"model.head: the {kind} head has no setting {', '.join(unknown)} "
                         f"(it takes {', '.join(PROMPT_FREE_HEADS[kind]) or 'none'})")
    return {"type": kind, **PROMPT_FREE_HEADS[kind], **config}


def build_vit_head(sam: FrozenSam, num_classes: int) -> PromptFreeMaskDecoder:
    """The ViT head: copies of SAM's decoder parts (trainable; SAM's own stay frozen) and its output tokens."""
    decoder = sam.mask_decoder
    parts = copy.deepcopy(nn.ModuleList([decoder.transformer, decoder.output_upscaling,
                                         decoder.output_hypernetworks_mlps[0]])).requires_grad_(True)
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    return PromptFreeMaskDecoder(*parts, output_tokens=output_tokens, image_pe=sam.prompt_encoder.get_dense_pe(),
                                 num_classes=num_classes)


def build_head(head_config: Dict[str, Any], sam: FrozenSam, num_classes: int = 1) -> nn.Module:
    """A prompt-free head from ``model.head`` (``{"type": "vit" | "cnn" | "linear", ...}``) for ``sam``'s embedding.

    The ViT head starts from SAM's trained mask decoder; the CNN and linear heads start random.
    """
    settings = head_settings(head_config)
    kind = settings.pop("type")
    embed_dim = sam.embedding_shape[0]
    if kind == "vit":
        return build_vit_head(sam, num_classes)
    if kind == "cnn":
        return ConvHead(embed_dim, num_classes, hidden_channels=int(settings["hidden_channels"]))
    if kind == "linear":
        return LinearHead(embed_dim, num_classes)
    raise ValueError(f"model.head.type {kind} is AutoSAM's prompt generator, not a prompt-free head")
