"""The quantized layout of a model, as a checkpoint records it, and the abstract twin it gives.

    layers, perms = module_layout(qmodel)          # JSON-able: what differs from the FP model
    abstract = apply_layout(nnx.eval_shape(build), layers, perms)   # same state structure
    check_against_target(orbax_metadata, nnx.to_pure_dict(nnx.state(abstract)), where)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pqjax import formats
from pqjax.errors import CheckpointError
from pqjax.layers import QuantLinear, QuantState
from pqjax.models.layers import Linear, Permutation
from pqjax.models.paths import module_at
from pqjax.quantize import set_module


def format_spec(fmt: formats.Format | None) -> dict[str, Any] | None:
    if fmt is None:
        return None
    spec = {"name": fmt.name}
    for key in ("group", "scaling"):
        if hasattr(fmt, key):
            spec[key] = getattr(fmt, key)
    return spec


def format_from_spec(spec: dict[str, Any] | None) -> formats.Format | None:
    if spec is None:
        return None
    return formats.get(spec["name"], **{k: v for k, v in spec.items() if k != "name"})


def module_layout(model: nnx.Module) -> tuple[dict[str, Any], dict[str, int]]:
    """(quantized layers, absorbed norm permutations) of `model`, by dotted path: what an
    abstract twin needs to hold the same state."""
    layers, perms = {}, {}
    for path, node in nnx.iter_graph(model):
        name = ".".join(str(p) for p in path)
        if isinstance(node, QuantLinear):
            layers[name] = {
                "in_features": node.in_features,
                "out_features": node.out_features,
                "bias": node.bias is not None,
                "dtype": jnp.dtype(node.dtype).name,
                "weights": format_spec(node.weight_fmt),
                "acts": format_spec(node.act_fmt),
                "act_global_scale": node.act_global_scale is not None,
                "input_scale": node.input_scale is not None,
                "low_rank": None
                if node.low_rank_down is None
                else int(node.low_rank_down.get_value().shape[1]),
                "input_transform": node.input_transform,
            }
        elif getattr(node, "perm", None) is not None and isinstance(node.perm, Permutation):
            perms[name] = int(node.perm.shape[0])
    return layers, perms


def apply_layout(model: nnx.Module, layers: dict[str, Any], perms: dict[str, int]) -> nnx.Module:
    """Give an abstract full-precision `model` the structure `module_layout` recorded."""
    for path, dim in perms.items():
        module_at(model, path).perm = Permutation(jax.ShapeDtypeStruct((dim,), jnp.int32))
    for path, lay in layers.items():
        set_module(model, path, _abstract_quant_linear(lay))
    return model


def _abstract_quant_linear(lay: dict[str, Any]) -> QuantLinear:
    wfmt, afmt = format_from_spec(lay["weights"]), format_from_spec(lay["acts"])
    dtype = jnp.dtype(lay["dtype"])

    def build() -> QuantLinear:
        lin = Linear(
            lay["in_features"],
            lay["out_features"],
            use_bias=lay["bias"],
            dtype=dtype,
            rngs=nnx.Rngs(0),
        )
        q = QuantLinear.from_linear(
            lin, weights=wfmt, acts=afmt, act_amax=1.0 if lay["act_global_scale"] else None
        )
        if lay["input_scale"]:
            q.input_scale = QuantState(jnp.zeros((lay["in_features"],), dtype))
        if lay["low_rank"]:
            r = lay["low_rank"]
            q.low_rank_down = QuantState(jnp.zeros((lay["in_features"], r), dtype))
            q.low_rank_up = QuantState(jnp.zeros((r, lay["out_features"]), dtype))
        return q

    q = nnx.eval_shape(build)
    q.input_transform = lay["input_transform"]
    return q


def flat(tree: Any) -> dict[str, Any]:
    """Leaves by dotted path; orbax stores integer (list-index) keys as strings."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)] = leaf
    return out


def check_against_target(ckpt_meta: Any, target: dict[str, Any], where: Path) -> None:
    """Refuse arrays whose shape or dtype differ from the layout the metadata records."""
    stored, wanted = flat(ckpt_meta), flat(target)
    for key, want in wanted.items():
        got = stored.get(key)
        if got is None:
            raise CheckpointError(f"{where}: no array for {key}")
        if tuple(got.shape) != tuple(want.shape) or np.dtype(got.dtype) != np.dtype(want.dtype):
            raise CheckpointError(
                f"{where}: {key} is {np.dtype(got.dtype)} {tuple(got.shape)}, the recorded layout "
                f"expects {np.dtype(want.dtype)} {tuple(want.shape)}"
            )
    extra = sorted(set(stored) - set(wanted))
    if extra:
        raise CheckpointError(f"{where}: arrays the recorded layout does not know: {extra[:5]}")
