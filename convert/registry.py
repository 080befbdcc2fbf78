"""Which NNX class and config dataclass serve each checkpoint `_class_name` / architecture.

Each model family declares its specs in `convert/keymaps/<family>.py` as `SPECS: list[ModelSpec]`,
with whatever key or config translation that family needs.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable
from typing import Any

from pqjax.models import configs


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How to build, read and write one model family.

    module(config, dtype=..., rngs=...) builds the NNX model; read_config(raw, source) parses
    config.json (default: strict dataclass fields); write_config(config) writes it back.
    """

    class_name: str
    module: type
    config: type
    weights_name: str = "diffusion_pytorch_model"
    ignore: tuple[str, ...] = ()
    read_config: Callable[[dict[str, Any], str], Any] | None = None
    write_config: Callable[[Any], dict[str, Any]] | None = None
    # All checkpoint keys -> {checkpoint key: model key, or None to skip} for keys that differ
    # (older or newer naming of the same weights).
    map_keys: Callable[[list[str]], dict[str, str | None]] | None = None
    # (model key prefix, config field): the number of numbered children under the prefix
    # (`prefix.0.`, `prefix.1.`, ...) must equal the field (an int, or a list's length). Checked
    # against the checkpoint's keys before the model is built, so a layer-count typo fails at
    # once instead of after building thousands of abstract blocks.
    block_counts: tuple[tuple[str, str], ...] = ()

    def parse(self, raw: dict[str, Any], source: str) -> Any:
        if self.read_config is not None:
            return self.read_config(raw, source)
        return configs.from_dict(self.config, raw, source=source, ignore=self.ignore)

    def dump(self, config: Any) -> dict[str, Any]:
        if self.write_config is not None:
            return self.write_config(config)
        return configs.to_dict(config, self.class_name)


def _specs() -> list[ModelSpec]:
    import convert.keymaps as keymaps

    specs: list[ModelSpec] = []
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
