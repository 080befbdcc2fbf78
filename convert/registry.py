"""Which NNX class and config dataclass serve each checkpoint `_class_name` / architecture.

A transformer family declares its spec in its record (`pqjax.models.family`, `checkpoints`);
every other component (text encoders, autoencoders) in `convert/keymaps/<name>.py` as
`SPECS: list[ModelSpec]`, with whatever key or config translation it needs.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from pqjax.models import configs
from pqjax.models.family import families
from pqjax.models.spec import ModelSpec

__all__ = ["ModelSpec", "registry", "spec_for_class_name", "spec_for_model"]


def _specs() -> list[ModelSpec]:
    import convert.keymaps as keymaps

    specs: list[ModelSpec] = [s for fam in families() for s in fam.checkpoints]
    for info in sorted(pkgutil.iter_modules(keymaps.__path__), key=lambda i: i.name):
        specs.extend(importlib.import_module(f"convert.keymaps.{info.name}").SPECS)
    return specs


def registry() -> dict[str, ModelSpec]:
    return {s.class_name: s for s in _specs()}


def spec_for_class_name(name: str, source: str) -> ModelSpec:
    reg = registry()
    if name not in reg:
        raise configs.ConfigError(
            f"{source}: model class {name!r} is not supported; supported: {sorted(reg)}"
        )
    return reg[name]


def spec_for_model(model: Any) -> ModelSpec:
    for spec in _specs():
        if type(model) is spec.module:
            return spec
    raise TypeError(f"no checkpoint format is registered for {type(model).__name__}")
