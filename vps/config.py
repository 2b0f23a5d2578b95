"""Configs are YAML data in ``configs/``; command-line overrides are ``dotted.key=value`` (value parsed as YAML)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, Iterable

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
        if keys[-1] not in node:
            raise ConfigError(f"override '{override}': unknown key '{dotted}' (known here: {', '.join(node)})")
        try:
            node[keys[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"override '{override}': cannot parse value '{raw}'") from None
    return config


def save_config(config: Dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config, sort_keys=False))
