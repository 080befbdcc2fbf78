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
from pqjax.models.configs import ConfigError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


class WeightSource(Protocol):
    def keys(self) -> list[str]: ...
    def read(self, key: str) -> np.ndarray: ...
    def file_of(self, key: str) -> Path: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def dtype(self, key: str) -> np.dtype: ...


def stored_dtype(weights: WeightSource, keys: list[str]) -> np.dtype:
    """The dtype a model is held in by default: its checkpoint's own, the floating dtype of
    most of its parameters by count (bf16 for FLUX.1-dev). float64 is held as float32, and 8-bit
    floats (fp8 checkpoints) as bfloat16, the dtype they are computed in."""
    counts: dict[np.dtype, int] = {}
    for k in keys:
        dt = np.dtype(weights.dtype(k))
        if dt.kind in "fV":
            counts[dt] = counts.get(dt, 0) + int(np.prod(weights.shape(k), dtype=np.int64))
    if not counts:
        return np.dtype(np.float32)
    dt = max(counts, key=counts.get)
    if dt == np.float64:
        return np.dtype(np.float32)
    return np.dtype(jnp.bfloat16) if dt.itemsize == 1 else dt


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
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: missing") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise CheckpointError(
            f"{path}: a config must be a JSON object of fields, got a {type(raw).__name__}"
        )
    return raw


def class_name_of(raw: dict[str, Any], source: str) -> str:
    if "_class_name" in raw:
        name = raw["_class_name"]
    elif "architectures" in raw:
        archs = raw["architectures"]
        name = archs[0] if isinstance(archs, list) and archs else archs
    else:
        raise CheckpointError(f"{source}: no _class_name or architectures field")
    if not isinstance(name, str):
        raise CheckpointError(
            f"{source}: the model class (_class_name, or architectures[0]) must be a string, "
            f"got {name!r}"
        )
    return name


def check_block_counts(spec: registry.ModelSpec, config: Any, keys: list[str],
                       source: str) -> None:
    """The config's layer counts against the numbered blocks among the (model) keys.

    Runs before the model is built: a count that does not match the checkpoint fails at once
    with the field and both numbers, instead of after building every abstract block.
    """
    for prefix, field in spec.block_counts:
        value = getattr(config, field)
        want = value if isinstance(value, int) else len(value)
        head = prefix + "."
        found = {k[len(head):].split(".", 1)[0] for k in keys if k.startswith(head)}
        indices = sorted(int(i) for i in found if i.isdigit())
        have = indices[-1] + 1 if indices else 0
        if have != want:
            raise ConfigError(
                f"{source}: {field} = {value!r} means {want} blocks under {prefix!r}, but the "
                f"checkpoint has {have} ({prefix}.0 .. {prefix}.{have - 1})"
                if have else
                f"{source}: {field} = {value!r} means {want} blocks under {prefix!r}, but the "
                f"checkpoint has none"
            )
        if indices != list(range(have)):
            gaps = sorted(set(range(have)) - set(indices))
            raise CheckpointError(
                f"{source}: the checkpoint's blocks under {prefix!r} are not numbered 0..{have - 1}"
                f" (missing {gaps[:8]})"
            )


class ModelWeights:
    """A component folder's config and weights, read one tensor at a time by model key.

        w = ModelWeights(folder)                  # config parsed and checked, no tensor read
        model = w.load(w.abstract())              # the whole model
        block = w.load(nnx.clone(module_at(w.abstract(), "transformer_blocks.3")),
                       "transformer_blocks.3")    # one submodule, nothing else read

    dtype: what the parameters are held in (None: the checkpoint's own, `stored_dtype`).
    """

    def __init__(self, folder: str | os.PathLike, *, dtype: Any = None,
                 allow_pickle: bool = False):
        self.folder = Path(folder)
        raw = read_config(self.folder)
        self.source = str(self.folder / "config.json")
        self.spec = registry.spec_for_class_name(class_name_of(raw, self.source), self.source)
        self.config = self.spec.parse(raw, self.source)
        self.weights = open_weights(self.folder, self.spec.weights_name,
                                    allow_pickle=allow_pickle)
        self.origin = _model_keys(self.weights.keys(), self.spec)  # model key -> stored key
        check_block_counts(self.spec, self.config, list(self.origin), self.source)
        self.dtype = np.dtype(stored_dtype(self.weights, list(self.origin.values()))
                              if dtype is None else dtype)

    def abstract(self) -> nnx.Module:
        """The model with shapes only (`nnx.eval_shape`), in `self.dtype`."""
        return nnx.eval_shape(
            lambda: self.spec.module(self.config, dtype=self.dtype, rngs=nnx.Rngs(0)))

    def nbytes(self) -> int:
        """Bytes of the model's parameters in `self.dtype`, from the headers alone."""
        count = sum(int(np.prod(self.weights.shape(k), dtype=np.int64))
                    for k in self.origin.values())
        return count * self.dtype.itemsize

    def files(self) -> list[Path]:
        """The weight files the model is read from."""
        return sorted({self.weights.file_of(k) for k in self.origin.values()})

    def load(self, module: nnx.Module, prefix: str = "", digest: Any = None,
             exclude: tuple[str, ...] = ()) -> nnx.Module:
        """Fill the abstract `module`, the submodule at dotted `prefix` ("": the model), from
        the keys under `prefix`, but those under the submodules named in `exclude` (e.g. the
        block lists, for a model whose lists are empty); returned concrete. digest: a hashlib
        object updated with each key and the bytes read (in key order), to fingerprint what
        was read."""
        head = prefix + "." if prefix else ""
        skip = tuple(f"{head}{e}." for e in exclude)
        keys = sorted(k[len(head):] for k in self.origin
                      if k.startswith(head) and not k.startswith(skip))

        def read(k: str) -> np.ndarray:
            arr = self.weights.read(self.origin[head + k])
            if digest is not None:
                digest.update(f"{k}:{arr.dtype.str}:{arr.shape};".encode())
                digest.update(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
            return arr

        return bridge.load_params(
            module, read, keys, dtype=self.dtype,
            where=lambda k: str(self.weights.file_of(self.origin.get(head + k, head + k))),
            shape_of=lambda k: self.weights.shape(self.origin[head + k]),
        )


def load_model(
    folder: str | os.PathLike, *, dtype: Any = None, allow_pickle: bool = False
) -> nnx.Module:
    """Build the model `folder/config.json` describes and fill it from the folder's weights,
    held in `dtype` (None: the checkpoint's own, `stored_dtype`)."""
    w = ModelWeights(folder, dtype=dtype, allow_pickle=allow_pickle)
    return w.load(w.abstract())


def weight_bytes(
    folder: str | os.PathLike, *, dtype: Any = None, allow_pickle: bool = False
) -> int:
    """The bytes of the checkpoint's tensors in `dtype` (None: its own) that
    `load_model(folder, dtype=dtype)` holds, from its header alone: no tensor is read, no model
    built."""
    return ModelWeights(folder, dtype=dtype, allow_pickle=allow_pickle).nbytes()


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
    dtype: Any = None,
    *,
    allow_pickle: bool = False,
    subfolder: str = "transformer",
) -> nnx.Module:
    """The NNX transformer of a diffusers model folder, HF cache entry or short name, held in
    `dtype` (None: the checkpoint's own)."""
    return load_model(resolve(path_or_name, subfolder), dtype=dtype, allow_pickle=allow_pickle)
