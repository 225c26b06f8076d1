"""Flat config dataclasses filled from defaults, then a YAML preset, then `key=value` overrides.

Every command has one dataclass; each field's docstring-comment is its documentation. Values
from YAML or the command line are coerced to the field's declared type, and an unknown key is an
error that names it, not a silent typo. A dataclass may declare `RANGES` (field -> interval, e.g.
"[1, )" or "(0, 1]") and `CHOICES` (field -> allowed values); `build` checks both, then the
dataclass's own `validate()` for rules that join several fields.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path

import yaml

from handrail.errors import UsageError


class ConfigError(UsageError):
    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key  # the config key at fault, so the caller can say where its value came from


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
        raise ConfigError(f"config key {name!r}: expected true/false, got {value!r}", name)
    if hint is int:
        try:
            number = float(value)  # "1e3" and "1000.0" are whole numbers; "2.5" is not
        except (TypeError, ValueError):
            number = math.nan
        if isinstance(value, bool) or not math.isfinite(number) or not number.is_integer():
            raise ConfigError(f"config key {name!r}: expected a whole number, got {value!r}", name)
        return int(number)
    if hint is float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key {name!r}: expected a number, got {value!r}", name) from None
        if isinstance(value, bool) or not math.isfinite(number):
            raise ConfigError(f"config key {name!r}: expected a finite number, got {value!r}", name)
        return number
    if hint is str and isinstance(value, (dict, list)):
        raise ConfigError(f"config key {name!r}: expected a string, got {type(value).__name__}", name)
    return value if hint is not str or value is None else str(value)


def _interval(spec: str) -> tuple[float, bool, float, bool]:
    """'[1, )' -> (1, closed, inf, open)."""
    lo, hi = spec.strip()[1:-1].split(",")
    return (float(lo) if lo.strip() else -math.inf, spec.strip()[0] == "[",
            float(hi) if hi.strip() else math.inf, spec.strip()[-1] == "]")


def check(cfg) -> None:
    """The declared ranges and choices of a config object (see module docstring)."""
    for name, spec in getattr(cfg, "RANGES", {}).items():
        value = getattr(cfg, name)
        if value is None:
            continue
        lo, lo_closed, hi, hi_closed = _interval(spec)
        if not ((lo <= value if lo_closed else lo < value) and (value <= hi if hi_closed else value < hi)):
            raise ConfigError(f"config key {name!r}: expected a value in {spec}, got {value!r}", name)
    for name, allowed in getattr(cfg, "CHOICES", {}).items():
        value = getattr(cfg, name)
        allowed = allowed() if callable(allowed) else allowed  # a registry, read when checked
        if value is not None and value not in allowed:
            raise ConfigError(f"config key {name!r}: unknown {value!r}; choose {', '.join(map(str, allowed))}", name)


def _read_yaml(path) -> tuple[dict, dict]:
    """A config file's mapping, and the line each top-level key is on (for error messages)."""
    try:
        text = Path(path).read_text()
        loaded = yaml.safe_load(text) or {}
        node = yaml.compose(text)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or str(e).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got a {type(loaded).__name__}")
    lines = {}
    if isinstance(node, yaml.MappingNode):
        lines = {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}
    return loaded, lines


def build(cls, yaml_path: str | Path | None = None, overrides: list[str] | dict | None = None, **given):
    """Defaults < YAML file < explicit keyword values (from CLI flags) < `key=value` overrides.
    An error about a key whose value came from the file names the file and the key's line."""
    hints = typing.get_type_hints(cls)
    values: dict = {}
    where: dict = {}  # key -> "file:line", for keys the file set and nothing overrode
    if yaml_path:
        loaded, lines = _read_yaml(yaml_path)
        values.update(loaded)
        where = {k: f"{yaml_path}:{lines[k]}" if k in lines else str(yaml_path) for k in loaded}
    given = {k: v for k, v in given.items() if v is not None}
    values.update(given)
    if isinstance(overrides, dict):
        values.update(overrides)
        given.update(overrides)
    else:
        for item in overrides or []:
            if "=" not in item:
                hint = " (a config file is given with --config FILE)" if item.endswith((".yaml", ".yml")) else ""
                raise ConfigError(f"override {item!r}: expected key=value{hint}")
            k, v = item.split("=", 1)
            values[k.strip()] = v
            given[k.strip()] = v
    for k in given:
        where.pop(k, None)
    try:
        unknown = sorted(set(values) - set(hints))
        if unknown:
            raise ConfigError(f"unknown config key {unknown[0]!r} for {cls.__name__}", unknown[0])
        cfg = cls(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})
        check(cfg)
        if hasattr(cfg, "validate"):
            cfg.validate()
    except ConfigError as e:
        if e.key in where:
            raise ConfigError(f"{where[e.key]}: {e}", e.key) from None
        raise
    return cfg


def save(cfg, path: str | Path) -> None:
    Path(path).write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
