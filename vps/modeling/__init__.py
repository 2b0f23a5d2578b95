"""Models: frozen SAM backends, the prompt generator g (and a second one on SAM's embedding), the surrogate
decoder h, AutoSAM, prompt-free heads."""

from vps.modeling.autosam import AutoSAM, LightModel
from vps.modeling.build import (
    build_autosam,
    build_embedding_prompt,
    build_prompt_generator,
    build_surrogate,
    checkpoint_metadata,
    default_checkpoint_path,
    MODELS,
    load_model_from_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from vps.modeling.build_head import HEAD_TYPES, build_head
from vps.modeling.build_sam import SAM_BACKENDS, CheckpointError, build_sam
from vps.modeling.embedding_prompt import EmbeddingPromptHead
from vps.modeling.heads import ConvHead, LinearHead, PromptFreeMaskDecoder, PromptFreeSam
from vps.modeling.prompt_generator import PromptGenerator
from vps.modeling.sam import FrozenSam
from vps.modeling.surrogate import SurrogateDecoder

__all__ = [
    "AutoSAM", "LightModel", "FrozenSam", "PromptGenerator", "SurrogateDecoder", "CheckpointError",
    "SAM_BACKENDS", "build_sam", "build_autosam", "build_prompt_generator", "build_surrogate",
    "checkpoint_metadata", "save_checkpoint", "read_checkpoint", "load_model_from_checkpoint",
    "default_checkpoint_path", "MODELS", "HEAD_TYPES", "build_head", "PromptFreeSam", "PromptFreeMaskDecoder",
    "ConvHead", "LinearHead", "EmbeddingPromptHead", "build_embedding_prompt",
]
