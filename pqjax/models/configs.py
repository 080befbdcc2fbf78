"""Model configs as frozen dataclasses, read from and written to diffusers' `config.json`."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, TypeVar

from pqjax.errors import CheckpointError

C = TypeVar("C")

# Keys diffusers writes for bookkeeping; they carry no architecture.
_BOOKKEEPING = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}


class ConfigError(CheckpointError):
    """A config.json field this port does not support, or a value of the wrong type."""


def from_dict(cls: type[C], raw: dict[str, Any], *, source: str, ignore: tuple[str, ...] = ()) -> C:
    """Build config dataclass `cls` from a diffusers config dict; unknown fields are errors.

    `ignore` lists fields that are known and architecturally irrelevant (documented per model).
    `source` names the file in error messages.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _BOOKKEEPING or key in ignore or key.startswith("_"):
            continue
        if key not in fields:
            raise ConfigError(
                f"{source}: unsupported config field {key!r} = {value!r} for {cls.__name__}; "
                f"supported fields: {sorted(fields)}"
            )
        if isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    check_types(cls, kwargs, source)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: invalid config for {cls.__name__}: {e}") from e


def check_types(cls: type, kwargs: dict[str, Any], source: str) -> None:
    """Each value must have its field's annotated type, as JSON gives it (lists as tuples).

    bool is only true/false (not "no", not 1); int is not bool nor 1.5; float takes ints but
    not bool, NaN or inf; None only where the field is Optional. Raises ConfigError naming
    `source` and the field.
    """
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation this module cannot resolve: leave it to the dataclass
        hints = {}
    for key, value in kwargs.items():
        hint = hints.get(key, Any)
        if not _matches(value, hint):
            raise ConfigError(
                f"{source}: config field {key!r} = "
                f"{list(value) if isinstance(value, tuple) else value!r} must be "
                f"{_describe(hint)}"
            )


def _matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        if isinstance(value, bool):
            return False
        return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(args) == len(value) and all(map(_matches, value, args))
    return True  # types this checker does not know are left to the dataclass


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if hint is type(None):
        return "null"
    if origin is tuple:
        plural = {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}
        inner = plural.get(args[0], _describe(args[0])) if args else "values"
        fixed = "" if len(args) == 2 and args[1] is Ellipsis else f" ({len(args)} of them)"
        return f"a list of {inner}{fixed}"
    names = {bool: "true/false", int: "an integer", float: "a finite number", str: "a string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def to_dict(config: Any, class_name: str) -> dict[str, Any]:
    """The diffusers `config.json` dict for `config`, tagged with `_class_name`."""
    out: dict[str, Any] = {"_class_name": class_name}
    for key, value in dataclasses.asdict(config).items():
        out[key] = list(value) if isinstance(value, tuple) else value
    return out
