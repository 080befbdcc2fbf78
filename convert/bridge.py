"""Map NNX parameters onto torch state-dict keys, load a checkpoint into a model, export back.

The key map is derived from the model itself: every module path mirrors the torch module tree
(`pqjax.models.layers` conventions), and each layer class declares how its parameters are
named and laid out in torch (`TORCH_PARAMS`). Any other `nnx.Param` attribute keeps its name
and layout. So the model defines the expected key set, and missing / unexpected keys and
shape mismatches are found by comparing it with the checkpoint.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np
from flax import nnx

from convert.safetensors_io import CheckpointError, host_array

# torch layout -> flax layout, and back.
_TO_FLAX: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "same": lambda a: a,
    "linear": lambda a: a.T,  # (out, in) -> (in, out)
    "conv1d": lambda a: a.transpose(2, 1, 0),  # (O, I, k) -> (k, I, O)
    "conv2d": lambda a: a.transpose(2, 3, 1, 0),  # (O, I, kh, kw) -> (kh, kw, I, O)
    "conv1x1": lambda a: a.reshape(a.shape[:2]).T,  # (O, I, 1, 1) -> (I, O): a 1x1 conv as Linear
}
_TO_TORCH: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "same": lambda a: a,
    "linear": lambda a: a.T,
    "conv1d": lambda a: a.transpose(2, 1, 0),
    "conv2d": lambda a: a.transpose(3, 2, 0, 1),
    "conv1x1": lambda a: a.T[:, :, None, None],
}

Path = tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class ParamRef:
    """Where a torch key lives in the NNX model, and how its layout differs."""

    path: Path  # NNX state path, e.g. ('transformer_blocks', 0, 'attn', 'to_q', 'kernel')
    layout: str


def torch_key(path: Iterable[Any]) -> str:
    return ".".join(str(p) for p in path)


def param_map(model: nnx.Module) -> dict[str, ParamRef]:
    """torch key -> ParamRef for every `nnx.Param` of `model` (abstract models work too)."""
    out: dict[str, ParamRef] = {}
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Module):
            continue
        declared: dict[str, tuple[str, str]] = getattr(type(node), "TORCH_PARAMS", {})
        for name, value in vars(node).items():
            if not isinstance(value, nnx.Param):
                continue
            tname, layout = declared.get(name, (name, "same"))
            out[torch_key((*path, tname))] = ParamRef((*path, name), layout)
    return out


def _check_convertible(model: nnx.Module) -> None:
    for path, node in nnx.iter_graph(model):
        if getattr(node, "perm", None) is not None:
            raise ValueError(
                f"{torch_key(path)} reads its input through an absorbed permutation, which a "
                "diffusers checkpoint cannot express; export the model before permute.absorb"
            )
        if isinstance(node, nnx.Module) and type(node).__name__ == "QuantLinear":
            raise ValueError(
                f"{torch_key(path)} is quantized; diffusers layout holds full-precision weights "
                "only (save quantized models with pqjax.save)"
            )


def load_params(
    model: nnx.Module,
    read: Callable[[str], np.ndarray],
    keys: Iterable[str],
    *,
    dtype: Any,
    where: Callable[[str], str],
    shape_of: Callable[[str], tuple[int, ...]] | None = None,
) -> nnx.Module:
    """Fill `model`'s parameters from a checkpoint, one tensor at a time.

    model: usually abstract (`nnx.eval_shape`); returned concrete. read(key) -> array in its
    stored dtype; where(key) names the file for error messages; shape_of(key), when given, the
    stored shape without reading. Missing and unexpected keys (and, with shape_of, every shape)
    are checked before any tensor is read. Each tensor is converted to `dtype` and moved into
    the model before the next is read. float64 weights are cast with a warning per file.
    """
    refs = param_map(model)
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    keys = list(keys)
    _check_keys(refs, keys, where)
    if shape_of is not None:
        _check_shapes(refs, flat, keys, shape_of, where)
    warned: set[str] = set()
    for key in keys:
        ref = refs[key]
        var = flat[ref.path]
        expected = tuple(var.get_value().shape)
        raw = read(key)
        try:
            arr = _TO_FLAX[ref.layout](raw)
        except ValueError:  # e.g. a 3x3 kernel where a 1x1 conv is expected
            arr = raw
        if arr.shape != expected:
            raise CheckpointError(
                f"{where(key)}: key {key!r} has shape {list(raw.shape)}, the model expects "
                f"{list(_TO_TORCH[ref.layout](_probe(expected)).shape)} (torch layout)"
            )
        if arr.dtype.kind not in "fV":  # ml_dtypes floats (bf16, fp8) have kind "V"
            raise CheckpointError(f"{where(key)}: key {key!r} has non-float dtype {arr.dtype}")
        if arr.dtype == np.float64 and np.dtype(dtype) != arr.dtype and where(key) not in warned:
            warned.add(where(key))
            warnings.warn(
                f"{where(key)}: float64 weights (first: {key!r}) are cast to "
                f"{np.dtype(dtype).name}; digits beyond that precision are dropped",
                UserWarning, stacklevel=2,
            )
        # Cast on the host (a device-side cast compiles one convert per shape) and hand XLA a
        # contiguous buffer: jnp.asarray of a transposed view makes an extra copy.
        if not (arr.flags.c_contiguous and arr.dtype == np.dtype(dtype)):
            out = host_array(arr.shape, dtype)
            np.copyto(out, arr, casting="unsafe")
            arr = out
        var.set_value(jax.device_put(arr))
        del raw, arr
    return nnx.merge(graphdef, state)


def _probe(shape: tuple[int, ...]) -> np.ndarray:
    """An array of `shape` that takes no memory, to see what a layout change does to a shape."""
    return np.broadcast_to(np.empty((), np.uint8), shape)


def _check_keys(refs: dict[str, ParamRef], keys: list[str], where: Callable[[str], str]) -> None:
    missing = sorted(set(refs) - set(keys))
    unexpected = [k for k in keys if k not in refs]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {_few(missing)}")
        if unexpected:
            parts.append(
                f"{len(unexpected)} unexpected keys: "
                + _few([f"{k} (in {where(k)})" for k in sorted(unexpected)])
            )
        raise CheckpointError("checkpoint does not match the model config: " + "; ".join(parts))


def _check_shapes(refs: dict[str, ParamRef], flat: dict, keys: list[str],
                  shape_of: Callable[[str], tuple[int, ...]],
                  where: Callable[[str], str]) -> None:
    """Every stored shape against the model's, from the headers alone (nothing is read)."""
    bad = []
    for key in keys:
        ref = refs[key]
        expected = tuple(flat[ref.path].get_value().shape)
        stored = tuple(shape_of(key))
        try:
            got = _TO_FLAX[ref.layout](_probe(stored)).shape
        except ValueError:
            got = stored
        if tuple(got) != expected:
            torch_shape = list(_TO_TORCH[ref.layout](_probe(expected)).shape)
            bad.append(f"{where(key)}: key {key!r} has shape {list(stored)}, the model expects "
                       f"{torch_shape} (torch layout)")
    if bad:
        more = f" (+{len(bad) - 1} more tensors of the wrong shape)" if len(bad) > 1 else ""
        raise CheckpointError(bad[0] + more)


def _few(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


def export_arrays(
    model: nnx.Module, dtype: Any | None = None
) -> tuple[list[tuple[str, tuple[int, ...], np.dtype]], Callable[[str], np.ndarray]]:
    """(key, torch shape, dtype) for each parameter, and a getter producing one at a time."""
    _check_convertible(model)
    refs = param_map(model)
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    specs = []
    for key, ref in sorted(refs.items()):
        value = flat[ref.path].get_value()
        shape = tuple(_TO_TORCH[ref.layout](np.empty(value.shape, np.uint8)).shape)
        specs.append((key, shape, np.dtype(dtype or value.dtype)))

    def get(key: str) -> np.ndarray:
        ref = refs[key]
        value = jax.device_get(flat[ref.path].get_value())
        out = _TO_TORCH[ref.layout](np.asarray(value))
        return out.astype(dtype or out.dtype, order="C")  # a copy; 0-d stays 0-d

    return specs, get
