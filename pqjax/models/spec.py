"""How one model class is built, read and written: its checkpoint class name, module, config
parsing and key renames (a leaf of the models layer: the family records declare their
transformer's spec here, `convert.registry` collects every spec)."""

from __future__ import annotations

import dataclasses
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
