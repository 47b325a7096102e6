"""Typed configs: dataclasses loaded from YAML, with dotted CLI overrides.

Merge order: dataclass defaults <- YAML file <- ``key.sub=value`` overrides.
Unknown keys and wrong types are rejected with the dotted key in the message;
then every dataclass in the tree gets its ``validate()`` called, which raises
:class:`ConfigError` for impossible values. Used by ``mmdata`` and ``mmtrain``.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
_FLOAT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


class ConfigError(ValueError):
    """A bad config value. ``key`` is the dotted path, e.g. ``image.size``."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.detail = message


def require(condition: bool, key: str, message: str) -> None:
    """``validate()`` helper: raise ConfigError(key, message) unless condition holds."""
    if not condition:
        raise ConfigError(key, message)


def require_choice(value: Any, key: str, choices: typing.Sequence[Any]) -> None:
    require(value in choices, key, f"must be one of {', '.join(map(str, choices))}; got {value!r}")


def load_config(cls: type[T], path: str | Path | None, overrides: typing.Sequence[str] = ()) -> T:
    """Load ``cls`` from a YAML file (or defaults when ``path`` is None) plus overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            what = "is not a regular file" if path.exists() else "does not exist"
            raise ConfigError("", f"config file {path} {what}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError("", f"config file {path} is not valid YAML: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError("", f"config file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
        except OSError as e:
            raise ConfigError("", f"config file {path} cannot be read: {e.strerror or e}") from None
        if not isinstance(data, dict):
            raise ConfigError("", f"config file {path} must hold a mapping at the top level")
    for override in overrides:
        apply_override(data, override)
    config = from_dict(cls, data)
    validate_tree(config)
    return config


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply ``a.b.c=value`` to a nested dict; the value is parsed as YAML (``3``, ``true``, ``[1,2]``)."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError("", f"override {override!r} must look like key.sub=value")
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(".".join(parts), f"cannot override inside {part!r}: it is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        node[parts[-1]] = raw


def from_dict(cls: type[T], data: Any, prefix: str = "") -> T:
    """Build dataclass ``cls`` from plain data, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(prefix, f"expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = prefix + "." if prefix else ""
        raise ConfigError(f"{where}{unknown[0]}", f"unknown key; expected one of: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        values[name] = _coerce(hints[name], value, key)
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, {} if value is None else value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(e.detail)
        raise ConfigError(key, " or ".join(errors))
    if hint is Any:
        return value
    if origin is typing.Literal:
        require_choice(value, key, args)
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}")
        item = args[0] if args else Any
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)   # YAML 1.1 reads 3e-4 (no dot) as a string; everyone writes learning rates so
    if hint in (int, float, str, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise ConfigError(key, f"expected {hint.__name__}, got {value!r}")
        return value
    return value


def validate_tree(config: Any, prefix: str = "") -> None:
    """Call ``validate()`` on every dataclass in the tree, prefixing keys with their path."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            validate_tree(value, f"{prefix}{f.name}.")
    validate = getattr(config, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError as e:
            if prefix and not e.key.startswith(prefix):
                raise ConfigError(prefix + e.key, e.detail) from None
            raise


def to_dict(config: Any) -> dict[str, Any]:
    """Plain-data form of a config (for dataset.json and checkpoints)."""
    return dataclasses.asdict(config)
