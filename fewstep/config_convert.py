"""Typed conversion of plain data (YAML) into the config's dataclasses: every field's annotated
type is checked and converted, and a wrong key or value is a ConfigError naming the dotted key.
`fewstep.config` holds the dataclasses; objectives' hyperparameters go through `dataclass_from`
too (`fewstep.objectives.registry`)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Union

from .errors import UserError

__all__ = ["ConfigError", "coerce", "dataclass_from"]


class ConfigError(UserError):
    """A configuration problem; the message names the dotted key."""


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp) if a is not Ellipsis)
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert `value` to the annotated type `tp` or raise ConfigError naming `key`."""
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if isinstance(value, float) and not math.isfinite(value):  # YAML .nan / .inf, or "nan" read as float
        raise ConfigError(f"{key}: must be a finite number, got {value!r}")
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return _union(value, typing.get_args(tp), key, bad)
    if origin is Literal:
        return _literal(value, typing.get_args(tp), bad)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise bad
        return dataclass_from(tp, value, key)
    if origin in (list, tuple):
        return _sequence(value, origin, typing.get_args(tp), key, bad)
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        _, vt = typing.get_args(tp) or (str, Any)
        return {str(k): coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    return _scalar(value, tp, key, bad)


def _union(value: Any, args: tuple, key: str, bad: ConfigError) -> Any:
    """The first member type of an `X | Y | None` that takes `value` (the member's own error when
    only one could)."""
    if value is None:
        if type(None) in args:
            return None
        raise bad
    errors = []
    for a in args:
        if a is type(None):
            continue
        try:
            return coerce(value, a, key)
        except ConfigError as e:
            errors.append(e)
    if len(errors) == 1:
        raise errors[0]
    raise bad


def _literal(value: Any, opts: tuple, bad: ConfigError) -> Any:
    if isinstance(value, bool):  # YAML 1.1 reads no / off / yes / on as booleans
        for word in ("no", "off", "false") if not value else ("yes", "on", "true"):
            if word in opts:
                return word
        raise bad
    if value in opts:
        return value
    raise bad


def _sequence(value: Any, origin: type, args: tuple, key: str, bad: ConfigError) -> list | tuple:
    """A list, a fixed-length tuple (one type per place) or a `tuple[X, ...]`."""
    if not isinstance(value, (list, tuple)):
        raise bad
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}: {value!r}")
        return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    inner = args[0] if args else Any
    out = [coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    return tuple(out) if origin is tuple else out


def _scalar(value: Any, tp: Any, key: str, bad: ConfigError) -> Any:
    """bool, int, float, str and other plain classes; YAML's strings for numbers are read as numbers."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 as a string
            try:
                v = float(value)
            except ValueError:
                raise bad from None
            return coerce(v, tp, key)  # refuses nan / inf
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise bad
    return value


def dataclass_from(cls: type, data: dict, prefix: str) -> Any:
    """`cls(**data)` with every value converted to its field's type; an unknown key is an error
    that lists the known ones."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(
                f"{key}: unknown key; known keys{' under ' + prefix if prefix else ''}: {', '.join(sorted(names))}"
            )
        kw[k] = coerce(v, hints[k], key)
    return cls(**kw)
