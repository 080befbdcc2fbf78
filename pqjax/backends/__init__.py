"""Backends: what runs a model's quantized linears and norms. Binds the Pallas kernels to the
NNX layers, and plans which norms quantize for their consumers.

    pqjax.set_backend(qmodel, "pallas")   # the kernels on a CUDA GPU; XLA elsewhere, warned
    pqjax.set_backend(qmodel, "xla")      # fake quantization in XLA (the default)

The layers (`pqjax.models.layers` norms, `pqjax.layers.QuantLinear`) know only the name of
their backend; importing this package binds "pallas" to `dispatch` (kernel or XLA fallback)
and `fusion` (a norm that quantizes for its consumers), so nothing below imports upward.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from pqjax.backends import dispatch, fusion
from pqjax.layers import BACKENDS, QuantLinear, register_linear_route
from pqjax.models.layers import LayerNorm, RMSNorm, register_norm_route


def _pallas_norm(norm: Any, x: jax.Array, scale: jax.Array | None, shift: jax.Array | None) -> Any:
    """The "pallas" norm: the kernel, or, when the norm quantizes for its consumers, a
    PendingNorm that the first of them runs (`fusion`)."""
    if norm.fuse_quant:
        return fusion.PendingNorm(norm, x, scale, shift)
    return dispatch.permuted_norm(norm, x, scale, shift)


register_norm_route("pallas", _pallas_norm)
register_linear_route("pallas", dispatch.quant_linear)


def set_backend(model: nnx.Module, backend: str) -> nnx.Module:
    """Switch every QuantLinear and norm in `model` to `backend`, in place.

    With "pallas", norms whose consumers allow it also quantize for them in the same kernel
    pass (`fusion.plan`).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    for _, node in nnx.iter_graph(model):
        if isinstance(node, QuantLinear):
            node.backend = backend
        elif isinstance(node, LayerNorm | RMSNorm):
            node.backend = "pallas" if backend == "pallas" else "xla"
            node.fuse_quant = node.fuse_dense = False
    if backend == "pallas":
        dispatch.warn_no_gpu()
        fusion.plan(model)
    return model


__all__ = ["dispatch", "fusion", "set_backend"]
