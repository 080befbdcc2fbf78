"""Load a diffusers / transformers component folder into an NNX model (export: convert.export).

model = load_transformer("flux-dev", dtype=jnp.bfloat16)   # or a local path
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert import bridge, registry
from convert.resolve import resolve
from convert.safetensors_io import Checkpoint, CheckpointError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


class WeightSource(Protocol):
    def keys(self) -> list[str]: ...
    def read(self, key: str) -> np.ndarray: ...
    def file_of(self, key: str) -> Path: ...


def open_weights(folder: Path, weights_name: str, *, allow_pickle: bool = False) -> WeightSource:
    """The checkpoint in `folder`: sharded index, single safetensors, or (opt-in) pickle."""
    for candidate in (f"{weights_name}.safetensors.index.json", f"{weights_name}.safetensors"):
        if (folder / candidate).is_file():
            return Checkpoint.open(folder / candidate)
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    singles = sorted(folder.glob("*.safetensors"))
    if len(indexes) == 1:
        return Checkpoint.open(indexes[0])
    if len(singles) == 1 and not indexes:
        return Checkpoint.open(singles[0])
    if indexes or singles:
        raise CheckpointError(
            f"{folder}: several checkpoints and none named {weights_name}.safetensors: "
            f"{[p.name for p in indexes + singles]}"
        )
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        if not allow_pickle:
            raise CheckpointError(
                f"{folder}: only pickled weights ({', '.join(p.name for p in pickles)}). Pickles "
                "can run code when loaded; pass allow_pickle=True (CLI: --allow-pickle) to load "
                "them with torch's weights_only=True, or convert them to safetensors first."
            )
        from convert.pickled import PickledCheckpoint

        return PickledCheckpoint(pickles)
    raise CheckpointError(f"{folder}: no weights found (*.safetensors, *.safetensors.index.json)")


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: missing") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def class_name_of(raw: dict[str, Any], source: str) -> str:
    if "_class_name" in raw:
        return raw["_class_name"]
    if raw.get("architectures"):
        return raw["architectures"][0]
    raise CheckpointError(f"{source}: no _class_name or architectures field")


def load_model(
    folder: str | os.PathLike, *, dtype: Any = jnp.float32, allow_pickle: bool = False
) -> nnx.Module:
    """Build the model `folder/config.json` describes and fill it from the folder's weights."""
    folder = Path(folder)
    raw = read_config(folder)
    source = str(folder / "config.json")
    spec = registry.spec_for_class_name(class_name_of(raw, source), source)
    config = spec.parse(raw, source)
    weights = open_weights(folder, spec.weights_name, allow_pickle=allow_pickle)
    model = nnx.eval_shape(lambda: spec.module(config, dtype=dtype, rngs=nnx.Rngs(0)))
    origin = _model_keys(weights.keys(), spec)
    return bridge.load_params(
        model,
        lambda k: weights.read(origin[k]),
        list(origin),
        dtype=dtype,
        where=lambda k: str(weights.file_of(origin.get(k, k))),
    )


def load_submodule(module: nnx.Module, prefix: str, weights: WeightSource, *,
                   dtype: Any = jnp.float32) -> nnx.Module:
    """Fill `module`, the (abstract) submodule at dotted `prefix` of a model, from the checkpoint
    keys under `prefix`; one tensor at a time, nothing else is read."""
    head = prefix + "."
    keys = [k[len(head):] for k in weights.keys() if k.startswith(head)]
    return bridge.load_params(module, lambda k: weights.read(head + k), keys, dtype=dtype,
                              where=lambda k: str(weights.file_of(head + k)))


def _model_keys(keys: list[str], spec: registry.ModelSpec) -> dict[str, str]:
    """model key -> checkpoint key, after the family's renames; a collision is an error."""
    renames = spec.map_keys(keys) if spec.map_keys is not None else {}
    origin: dict[str, str] = {}
    for key in keys:
        target = renames.get(key, key)
        if target is None:
            continue
        if target in origin:
            raise CheckpointError(
                f"checkpoint keys {origin[target]!r} and {key!r} both map to {target!r}"
            )
        origin[target] = key
    return origin


def load_transformer(
    path_or_name: str | os.PathLike,
    dtype: Any = jnp.float32,
    *,
    allow_pickle: bool = False,
    subfolder: str = "transformer",
) -> nnx.Module:
    """The NNX transformer of a diffusers model folder, HF cache entry or short name."""
    return load_model(resolve(path_or_name, subfolder), dtype=dtype, allow_pickle=allow_pickle)
