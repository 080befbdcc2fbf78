"""Model configs as frozen dataclasses, read from and written to diffusers' `config.json`."""

from __future__ import annotations

import dataclasses
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
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: invalid config for {cls.__name__}: {e}") from e


def to_dict(config: Any, class_name: str) -> dict[str, Any]:
    """The diffusers `config.json` dict for `config`, tagged with `_class_name`."""
    out: dict[str, Any] = {"_class_name": class_name}
    for key, value in dataclasses.asdict(config).items():
        out[key] = list(value) if isinstance(value, tuple) else value
    return out
