"""Name -> format-constructor registry. The only module-level state, filled at import time.

A new format (e.g. issue 6's `quartz`) registers a factory::

    @register("quartz")
    def _quartz(**kwargs) -> Format:
        return Quartz(**kwargs)

and is then reachable through :func:`get`, :func:`names`, ``fake_quant(x, "quartz")``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from pqjax.formats.base import Format

F = TypeVar("F", bound=Callable[..., Format])

_FACTORIES: dict[str, Callable[..., Format]] = {}


def register(name: str, factory: F | None = None, *, replace: bool = False) -> Any:
    """Register `factory(**kwargs) -> Format` under `name`; usable as a decorator.

    Re-registering a name raises ValueError unless replace=True.
    """
    key = name.lower()

    def _do(f: F) -> F:
        if key in _FACTORIES and not replace:
            raise ValueError(f"format name {key!r} is already registered")
        _FACTORIES[key] = f
        return f

    return _do if factory is None else _do(factory)


def names() -> list[str]:
    """Sorted list of registered format names."""
    return sorted(_FACTORIES)


def get(name: str | Format, **kwargs: Any) -> Format:
    """Format object for a registered name (kwargs such as group=, scaling=, symmetric=).

    A Format passes through (with kwargs applied via dataclasses.replace if given).
    Unknown names raise ValueError listing the valid ones.
    """
    if isinstance(name, Format):
        return name.replace(**kwargs) if kwargs else name
    if not isinstance(name, str):
        raise TypeError(f"format must be a name or a Format, got {type(name).__name__}")
    key = name.lower()
    if key not in _FACTORIES:
        raise ValueError(f"unknown format {name!r}; valid names: {', '.join(names())}")
    return _FACTORIES[key](**kwargs)
