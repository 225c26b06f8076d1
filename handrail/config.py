"""Flat config dataclasses filled from defaults, then a YAML preset, then `key=value` overrides.

Every command has one dataclass; each field's docstring-comment is its documentation. Values
from YAML or the command line are coerced to the field's declared type, and an unknown key is an
error that names it, not a silent typo.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path

import yaml


class ConfigError(ValueError):
    pass


def _coerce(name: str, value, hint):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        hint = args[0]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"config key {name!r}: expected true/false, got {value!r}")
    if hint in (int, float):
        try:
            return hint(float(value)) if hint is int and str(value).replace(".", "").isdigit() else hint(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key {name!r}: expected {hint.__name__}, got {value!r}") from None
    return value if hint is not str or value is None else str(value)


def build(cls, yaml_path: str | Path | None = None, overrides: list[str] | dict | None = None, **given):
    """Defaults < YAML file < explicit keyword values (from CLI flags) < `key=value` overrides."""
    hints = typing.get_type_hints(cls)
    values: dict = {}
    if yaml_path:
        try:
            loaded = yaml.safe_load(Path(yaml_path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{yaml_path}: cannot read config ({str(e).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{yaml_path}: expected a mapping of config keys")
        values.update(loaded)
    values.update({k: v for k, v in given.items() if v is not None})
    if isinstance(overrides, dict):
        values.update(overrides)
    else:
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"override {item!r}: expected key=value")
            k, v = item.split("=", 1)
            values[k.strip()] = v
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r} for {cls.__name__}")
    cfg = cls(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def save(cfg, path: str | Path) -> None:
    Path(path).write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
