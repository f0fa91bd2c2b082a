"""Typed dataclasses from TOML tables: each value checked against its field's type hint, unknown
keys refused, nested tables built as their sections; and `KEY=VALUE` overrides (`--set`).

    config = build_fields(TrainConfig, tomllib.loads(text), "", sections)
    key, value = parse_override("schedule.ranks=4")
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

import tomllib

from pipefold.errors import ConfigError

__all__ = ["apply_override", "build_fields", "parse_override"]


def coerce(path: str, value: Any, hint: Any) -> Any:
    """Check `value` against a field's type hint; ints are accepted for floats, lists for tuples."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
        if typing.get_origin(option) is tuple and isinstance(value, (list, tuple)):
            if all(isinstance(item, int) and not isinstance(item, bool) for item in value):
                return tuple(value)
    names = " or ".join(
        "a list of integers" if typing.get_origin(option) is tuple else option.__name__ for option in options
    )
    raise ConfigError(f"{path}={value!r} has the wrong type: expected {names}")


def build_fields(
    cls: type[Any],
    data: Mapping[str, Any],
    prefix: str,
    sections: Mapping[str, type[Any]],
    extra: Mapping[type[Any], Mapping[str, Any]] | None = None,
) -> Any:
    """`cls(**data)` with every value checked; at the top level (`prefix` ""), the keys named in
    `sections` are tables built as those dataclasses. `extra[cls]`: keyword arguments added to
    every `cls` built (values the caller has already read, not from TOML)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"[{prefix.rstrip('.')}]" if prefix else "the top level"
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]} in {where}; known keys: {', '.join(sorted(fields))}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if name in sections and not prefix:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{name}={value!r} must be a table ([{name}] in TOML)")
            kwargs[name] = build_fields(sections[name], value, f"{name}.", sections, extra)
        else:
            kwargs[name] = coerce(prefix + name, value, hints[name])
    kwargs.update((extra or {}).get(cls, {}))
    return cls(**kwargs)


def parse_override(text: str) -> tuple[str, Any]:
    """ "schedule.ranks=4" -> ("schedule.ranks", 4); values are read as TOML, else as a bare string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not KEY=VALUE; write e.g. schedule.ranks=4")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip(), value


def apply_override(data: dict[str, Any], key: str, value: Any, sections: Mapping[str, type[Any]]) -> None:
    """Set `key` ("steps" or "schedule.ranks") in the TOML-shaped `data`."""
    section, dot, name = key.partition(".")
    if not dot:
        data[key] = value
        return
    if section not in sections:
        raise ConfigError(f"unknown section in override {key!r}; sections: {', '.join(sections)}")
    table = data.setdefault(section, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{section}={table!r} must be a table ([{section}] in TOML)")
    table[name] = value
