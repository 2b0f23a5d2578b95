"""Configs are YAML data in ``configs/``; command-line overrides are ``dotted.key=value`` (value parsed as YAML)."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot be used."""


def load_config(path: str | Path) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"cannot parse {path}: {str(error).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} does not hold a mapping of settings")
    return config


def apply_overrides(config: Dict[str, Any], overrides: Iterable[str]) -> Dict[str, Any]:
    """Returns a copy of ``config`` with each ``a.b.c=value`` applied; unknown keys are an error (typos)."""
    config = copy.deepcopy(config)
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override '{override}' is not of the form key.sub=value")
        dotted, raw = override.split("=", 1)
        keys = dotted.strip().split(".")
        node = config
        for key in keys[:-1]:
            if not isinstance(node.get(key), dict):
                raise ConfigError(f"override '{override}': no section '{key}' in the config")
            node = node[key]
        if keys[-1] not in node and dotted not in SETTABLE:
            raise ConfigError(f"override '{override}': unknown key '{dotted}' (known here: {', '.join(node)})")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"override '{override}': cannot parse value '{raw}'") from None
        if isinstance(node.get(keys[-1]), dict) and not isinstance(value, dict) and not (
                value is None and dotted in OPTIONAL_SECTIONS):  # null turns an optional section off
            raise ConfigError(f"override '{override}': '{dotted}' is a section, not a value; set one of its keys "
                              f"({', '.join(f'{dotted}.{k}' for k in node[keys[-1]])})")
        node[keys[-1]] = value
    return config


def save_config(config: Dict[str, Any], path: str | Path) -> None:
    """Writes the YAML under a temporary name and renames it, so a reader never sees half a file."""
    path = Path(path)
    temporary = path.with_name(path.name + ".partial")
    temporary.write_text(yaml.safe_dump(config, sort_keys=False))
    temporary.replace(path)


# ---------------------------------------------------------------------------------------------------------------
# Validation. The schema lists the keys the trainer reads: key -> (kind, required). Only listed keys are checked;
# keys the schema does not list (new sections, backend-specific settings) pass untouched. A key whose section is
# absent is not checked (a required section reports itself).


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_float(value: Any) -> Optional[float]:
    """A finite number, also from a string such as '3e-4' (YAML 1.1 reads that as a string); None otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _choices(module: str, name: str, extra: Tuple[str, ...] = ()) -> Callable[[], Tuple[str, ...]]:
    def names() -> Tuple[str, ...]:
        import importlib

        return (*extra, *getattr(importlib.import_module(module), name))
    return names


_SAM_BACKENDS = _choices("vps.modeling.build_sam", "SAM_BACKENDS")
_HEAD_TYPES = _choices("vps.modeling.build_head", "HEAD_TYPES")
_VIEWS = _choices("vps.train.augment", "VIEWS")
_AUGMENT_ON = _choices("vps.train.augment", "AUGMENT_ON")
_PRECISIONS = _choices("vps.inference", "PRECISIONS", ("auto",))
_BACKENDS = _choices("vps.backends", "BACKEND_CHOICES")
_VIEW_LIST = "list of views (identity, hflip, vflip, rot90, rot180, rot270)"


def _is_view_list(value: Any) -> bool:
    return isinstance(value, list) and all(view in _VIEWS() for view in value)


# kind -> (check(value) -> bool, what is expected); float kinds also accept numeric strings, stored as floats
KINDS: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    "section": (lambda v: isinstance(v, dict), "a section of key: value settings"),
    "section?": (lambda v: v is None or isinstance(v, dict), "a section of key: value settings or null"),
    "int": (_is_int, "an integer"),
    "int>=0": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "int>=1": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "float>0": (lambda v: (_as_float(v) or 0) > 0, "a number > 0"),
    "float>=0": (lambda v: _as_float(v) is not None and _as_float(v) >= 0, "a number >= 0"),
    "fraction": (lambda v: _as_float(v) is not None and 0 <= _as_float(v) < 1, "a number in [0, 1)"),
    "share": (lambda v: _as_float(v) is not None and 0 <= _as_float(v) <= 1, "a number in [0, 1]"),
    "schedule": (lambda v: v in ("constant", "cosine"), "constant or cosine"),
    "optimizer": (lambda v: v in ("adam", "adamw"), "adam or adamw"),
    "schedule_by": (lambda v: v in ("epoch", "step"), "epoch or step"),
    "ints>=1": (lambda v: isinstance(v, list) and len(v) > 0 and all(_is_int(x) and x >= 1 for x in v),
                "a non-empty list of integers >= 1"),
    "share>0": (lambda v: _as_float(v) is not None and 0 < _as_float(v) <= 1, "a number in (0, 1]"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "str?": (lambda v: v is None or (isinstance(v, str) and v != ""), "a path or null"),
    "paths": (lambda v: (isinstance(v, str) and v != "") or (isinstance(v, list) and len(v) > 0 and all(
        isinstance(p, str) and p != "" for p in v)), "a folder or a non-empty list of folders"),
    "names?": (lambda v: v is None or (isinstance(v, list) and all(isinstance(n, (str, int)) for n in v)),
               "a list of clip names or null"),
    "scale?": (lambda v: v is None or (isinstance(v, list) and len(v) == 2 and all(
        (_as_float(x) or 0) > 0 for x in v)), "null or [min, max] scale factors > 0"),
    "backend": (lambda v: v in _SAM_BACKENDS(), "one of " + "|".join(("litemedsam", "vit_b", "vit_l", "vit_h"))),
    "head": (lambda v: v in _HEAD_TYPES(), "one of autosam_g|vit|cnn|linear"),
    "classes?": (lambda v: v is None or (isinstance(v, list) and len(v) > 0 and len(set(map(str, v))) == len(v) and all(
        isinstance(n, (str, int)) and str(n) not in ("", ".", "..") and "/" not in str(n) for n in v)),
                 "null or a list of distinct class names (mask folder names)"),
    "views": (lambda v: _is_view_list(v) and len(v) > 0, f"a non-empty {_VIEW_LIST}"),
    "views?": (lambda v: v is None or _is_view_list(v), f"null or a {_VIEW_LIST}"),
    "precision": (lambda v: v in _PRECISIONS(), "one of auto|fp32|bf16|fp16"),
    "encoder_backend": (lambda v: v in _BACKENDS(), "one of auto|eager|openvino|onnx|compile"),
    "augment_on": (lambda v: v in _AUGMENT_ON(), "one of auto|loader|device"),
    "minutes?": (lambda v: v is None or (_as_float(v) or 0) > 0, "null or a number of minutes > 0"),
    "decay?": (lambda v: v is None or (_as_float(v) is not None and 0 < _as_float(v) < 1),
               "null or a number in (0, 1)"),
}
FLOAT_KINDS = ("float>0", "float>=0", "fraction", "share", "share>0", "minutes?", "decay?")

_STAGE_SCHEMA = {"epochs": ("int>=1", True), "batch_size": ("int>=1", True), "lr": ("float>0", True),
                 "weight_decay": ("float>=0", True), "schedule": ("schedule", False),
                 "warmup_epochs": ("int>=0", False), "min_lr": ("float>=0", False),
                 "schedule_by": ("schedule_by", False), "max_minutes": ("minutes?", False),
                 "ema_decay": ("decay?", False), "optimizer": ("optimizer", False)}
SCHEMA: Dict[str, Tuple[str, bool]] = {
    "model": ("section", True),
    "model.sam": ("section", True),
    "model.sam.backend": ("backend", True),
    "model.sam.checkpoint": ("str?", False),
    "model.init_from": ("str?", False),
    "model.head": ("section?", False),
    "model.head.type": ("head", True),
    "data": ("section", True),
    "data.root": ("paths", True),
    "data.classes": ("classes?", False),
    "data.val_clips": ("names?", False),
    "data.val_fraction": ("fraction", False),
    "data.split_seed": ("int", False),
    "data.mask_size": ("int>=1", False),
    "data.random_crop": ("section?", False),
    "data.random_crop.size": ("int>=1", True),
    "data.random_crop.per_image": ("int>=1", True),
    "data.negatives": ("section?", False),
    "data.negatives.train_fraction": ("share", False),
    "data.negatives.val_fraction": ("share", False),
    "data.negatives.min_side": ("fraction", False),
    "augment": ("section?", False),
    "augment.hflip": ("bool", False),
    "augment.vflip": ("bool", False),
    "augment.rotate": ("float>=0", False),
    "augment.scale": ("scale?", False),
    "augment.color_jitter": ("section?", False),
    "cache": ("section", False),
    "cache.enabled": ("bool", False),
    "cache.dir": ("str", False),
    "cache.views": ("views", False),
    "cache.derived_views": ("views?", False),
    "cache.validation": ("bool", False),
    "runtime": ("section", False),
    "runtime.device": ("str", False),
    "runtime.precision": ("precision", False),
    "runtime.num_workers": ("int>=0", False),
    "runtime.encoder_backend": ("encoder_backend", False),
    "runtime.augment_on": ("augment_on", False),
    "runtime.seed": ("int", False),
}
# The keys of each kind of model (model.head.type): AutoSAM trains g then h; a prompt-free head is one stage.
AUTOSAM_G_SCHEMA: Dict[str, Tuple[str, bool]] = {
    "model.prompt_generator": ("section", True),
    "model.surrogate": ("section?", False),
    "model.box_refinement": ("bool", False),
    "model.flip_tta": ("bool", False),
    "model.embedding_prompt": ("section?", False),
    "model.embedding_prompt.hidden_channels": ("int>=1", False),
    "model.embedding_prompt.dilations": ("ints>=1", False),
    "model.embedding_prompt.weight": ("share>0", False),
    "train_g": ("section", True),
    **{f"train_g.{key}": rule for key, rule in _STAGE_SCHEMA.items()},
    "train_h": ("section", True),
    **{f"train_h.{key}": rule for key, rule in _STAGE_SCHEMA.items()},
    "train_embedding_prompt": ("section?", False),
    **{f"train_embedding_prompt.{key}": rule for key, rule in _STAGE_SCHEMA.items()},
}
HEAD_SCHEMA: Dict[str, Tuple[str, bool]] = {
    "train_head": ("section", True),
    **{f"train_head.{key}": rule for key, rule in _STAGE_SCHEMA.items()},
}
# The settings an override may add where a config file leaves them to their defaults (a typo is still an error).
SETTABLE = frozenset(key for schema in (SCHEMA, AUTOSAM_G_SCHEMA, HEAD_SCHEMA)
                     for key, (kind, _) in schema.items() if not kind.startswith("section"))
OPTIONAL_SECTIONS = frozenset(key for schema in (SCHEMA, AUTOSAM_G_SCHEMA, HEAD_SCHEMA)
                              for key, (kind, _) in schema.items() if kind == "section?")


def head_type(config: Dict[str, Any]) -> str:
    """``model.head.type``: ``autosam_g`` (AutoSAM's g, the default) or a prompt-free head (vit, cnn, linear)."""
    return _lookup(config, "model.head.type") or "autosam_g"


def class_names(config: Dict[str, Any]) -> list:
    """``data.classes`` as strings ([] for one unnamed class, masks straight in ``masks/``)."""
    return [str(name) for name in (_lookup(config, "data.classes") or [])]


def has_embedding_prompt(config: Dict[str, Any]) -> bool:
    """Whether an AutoSAM config adds the embedding prompt head (a ``model.embedding_prompt`` section)."""
    return head_type(config) == "autosam_g" and isinstance(_lookup(config, "model.embedding_prompt"), dict)


def training_stages(config: Dict[str, Any], requested: str = "all") -> Tuple[str, ...]:
    """The stages ``vps-train --stage requested`` runs: g, the embedding prompt head (when the config has
    ``model.embedding_prompt``) and h for AutoSAM, ``head`` for a prompt-free head."""
    if head_type(config) == "autosam_g":
        if requested == "embedding_prompt" and not has_embedding_prompt(config):
            raise ConfigError("--stage embedding_prompt: the config has no model.embedding_prompt section")
        if requested != "all":
            return (requested,)
        return ("g", "embedding_prompt", "h") if has_embedding_prompt(config) else ("g", "h")
    if requested not in ("all", "head"):
        raise ConfigError(f"--stage {requested}: this config trains a prompt-free {head_type(config)} head in one "
                          "stage; use --stage all")
    return ("head",)


def validate_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """Checks every key listed in ``SCHEMA``; returns a copy with numbers given as strings ('3e-4') made floats.

    Raises ConfigError naming the first bad key, what it must be and what it is. Epochs must be >= 1 (there is
    no "0 epochs = skip": choose the stages with ``--stage``).
    """
    if not isinstance(config, dict):
        raise ConfigError("the config is not a mapping of settings")
    config = copy.deepcopy(config)
    if _lookup(config, "model.init_from") and head_type(config) != "autosam_g":
        raise ConfigError("model.init_from starts AutoSAM's g (and h) from a trained checkpoint; a prompt-free "
                          f"{head_type(config)} head cannot start from one: remove model.init_from")
    kind_schema = AUTOSAM_G_SCHEMA if head_type(config) == "autosam_g" else HEAD_SCHEMA
    for dotted, (kind, required) in {**SCHEMA, **kind_schema}.items():
        *parents, key = dotted.split(".")
        node: Any = config
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue  # the section is absent or null: its own rule reports it if it is required
        if key not in node:
            if required:
                raise ConfigError(f"{dotted} is missing from the config (it must be {KINDS[kind][1]})")
            continue
        check, expected = KINDS[kind]
        if not check(node[key]):
            raise ConfigError(f"{dotted} must be {expected}, got {node[key]!r}")
        if kind in FLOAT_KINDS and isinstance(node[key], str):
            node[key] = float(node[key])
    cache = config.get("cache")
    if isinstance(cache, dict) and "dir" not in cache and (cache.get("enabled") or cache.get("validation")):
        setting = "cache.enabled" if cache.get("enabled") else "cache.validation"
        raise ConfigError(f"cache.dir is missing from the config (needed with {setting}: true)")
    classes = class_names(config)
    if len(classes) > 1 and head_type(config) == "autosam_g":
        raise ConfigError(f"data.classes names {len(classes)} classes but AutoSAM's g (model.head.type autosam_g) "
                          "segments one; use a prompt-free head (model.head.type vit, cnn or linear)")
    if classes and _lookup(config, "data.negatives"):
        raise ConfigError("data.negatives (polyp-free crops) works with one unnamed class; remove data.classes "
                          "or data.negatives")
    if _lookup(config, "data.random_crop") and _lookup(config, "data.negatives"):
        raise ConfigError("data.random_crop and data.negatives both cut crops; use one of them")
    if has_embedding_prompt(config) and not isinstance(config.get("train_embedding_prompt"), dict):
        raise ConfigError("train_embedding_prompt is missing from the config (model.embedding_prompt is trained in "
                          "its own stage; it must be a section of key: value settings)")
    if has_embedding_prompt(config):
        from vps.modeling.build import embedding_prompt_settings

        try:
            embedding_prompt_settings(config["model"]["embedding_prompt"])
        except ValueError as error:
            raise ConfigError(str(error)) from None
    if head_type(config) != "autosam_g":
        from vps.modeling.build_head import head_settings

        try:
            head_settings(config["model"]["head"])
        except ValueError as error:
            raise ConfigError(str(error)) from None
    return config


# ---------------------------------------------------------------------------------------------------------------
# Resume: a run continues with its own resolved config (<run>/config.yaml), not with the config file given again.

# Overrides that may change on resume; any other override must repeat the saved value.
RESUME_MAY_CHANGE = ("train_g.epochs", "train_h.epochs", "train_head.epochs", "train_embedding_prompt.epochs",
                     "runtime", "cache.dir", "cache.validation")


def _lookup(config: Dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for key in dotted.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node


def resume_config(run_dir: str | Path, overrides: Iterable[str]) -> Dict[str, Any]:
    """The saved config of the run in ``run_dir`` with ``overrides`` applied, validated.

    Only the epochs of each stage, ``runtime.*``, ``cache.dir`` and ``cache.validation`` may change: an override
    that changes any other key (data, model, augmentation, cache views, learning rate, batch size, ...) is a
    ConfigError naming the key.
    """
    run_dir = Path(run_dir)
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise ConfigError(f"--resume: {run_dir} holds no run to resume (no config.yaml); start it without --resume")
    overrides = list(overrides)
    saved = validate_config(load_config(saved_path))
    config = validate_config(apply_overrides(saved, overrides))
    for override in overrides:
        dotted = override.split("=", 1)[0].strip()
        if any(dotted == key or dotted.startswith(key + ".") for key in RESUME_MAY_CHANGE):
            continue
        if _lookup(config, dotted) != _lookup(saved, dotted):
            raise ConfigError(f"--resume: {dotted} cannot change on resume (the run in {run_dir} has "
                              f"{_lookup(saved, dotted)!r}); only {', '.join(RESUME_MAY_CHANGE[:4])}, runtime.*, "
                              f"cache.dir and cache.validation may; start a new run with another --out")
    return config
