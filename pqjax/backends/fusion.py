"""One kernel pass from the residual stream to packed activations: the norm quantizes for its
consumers.

    pqjax.set_backend(qmodel, "pallas")   # calls plan(qmodel): marks the norms it can fuse
    out = qmodel(**inputs)                # FLUX norm1 writes NVFP4 codes once; to_q/k/v read them

A norm is fused when it heads a permutation site that declares its output goes straight into
the consumers (`Site.direct`), and every consumer is a QuantLinear that the FP4 matmul kernel
serves, with the same activation format and static global scale and no online input scale or
transform. Its `__call__` then returns a `PendingNorm`. The first consumer runs the permuted
norm kernel with its activation format (gather, normalise, modulate and quantize in one pass)
and the others reuse the result, so no consumer quantizes the activations again. The kernel
writes only the codes and scales, not the 16-bit output, unless a consumer also reads the
dense input (a low-rank branch or an observer: `fuse_dense`). Where the kernels do not run
("xla" mode) the pending norm resolves to the plain norm.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.kernel_math import QuantSpec
from pqjax import formats
from pqjax.backends import dispatch
from pqjax.layers import QuantLinear
from pqjax.models.paths import module_at
from pqjax.permute.sites import sites


class PendingNorm:
    """A fused norm's call, run by its first QuantLinear consumer; lives within one trace.

    x `(B, T, d)` (or `(..., d)`), scale / shift `(B, d)` or None, as for the norm itself.
    """

    def __init__(self, norm: Any, x: jax.Array, scale: jax.Array | None, shift: jax.Array | None):
        self.norm, self.x, self.scale, self.shift = norm, x, scale, shift
        self._out: tuple[jax.Array, formats.QTensor | None] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The norm output's shape (FluxAttention splits the joint sequence by the context's)."""
        return self.x.shape

    @property
    def dtype(self) -> jnp.dtype:
        """The norm output's dtype: x's, promoted with the modulation rows' (as `modulate`)."""
        return jnp.result_type(*(a for a in (self.x, self.scale, self.shift) if a is not None))

    def astype(self, dtype: Any) -> PendingNorm | jax.Array:
        """Itself when the cast changes nothing (SANA casts norm1's output to the stream's
        dtype); otherwise the plain norm output, cast, which its consumers quantize."""
        if jnp.dtype(dtype) == self.dtype:
            return self
        return dispatch.permuted_norm(self.norm, self.x, self.scale, self.shift).astype(dtype)

    def resolve(self, qlin: Any) -> tuple[jax.Array | None, formats.QTensor | None]:
        """(y, xq): the norm's output and, where the kernels run, y quantized in `qlin`'s
        activation format (the same for every consumer, which `plan` checked). y is None
        when the kernels run and no consumer needs it (`plan` set `norm.fuse_dense` False)."""
        if self._out is None:
            args = (self.norm, self.x, self.scale, self.shift)
            if dispatch.mode() == "xla":
                self._out = (dispatch.permuted_norm(*args), None)
            else:
                gs = None if qlin.act_global_scale is None else qlin.act_global_scale[...]
                self._out = dispatch.permuted_norm(
                    *args, quant=qlin.act_fmt, global_scale=gs, dense=self.norm.fuse_dense
                )
        return self._out


def why_not(consumers: list[Any]) -> str | None:
    """Why a norm read by `consumers` cannot quantize for them, or None when it can."""
    if not consumers or not all(isinstance(c, QuantLinear) for c in consumers):
        return "not every consumer is a QuantLinear"
    first = consumers[0]
    for c in consumers:
        if c.act_fmt is None or c.act_fmt != first.act_fmt:
            return "the consumers do not share one activation format"
        if c.input_scale is not None or c.input_transform is not None:
            return "a consumer scales or transforms its input online"
        if c.weight_fmt.name not in dispatch.FP4 or c.act_fmt.name not in dispatch.FP4:
            return f"{c.weight_fmt.name} weights / {c.act_fmt.name} activations (kernels: FP4)"
        if (c.act_global_scale is None) != (first.act_global_scale is None):
            return "some consumers have a static activation global scale and some do not"
        if c.act_global_scale is not None and not np.array_equal(
            np.asarray(c.act_global_scale[...]), np.asarray(first.act_global_scale[...])
        ):
            return "the consumers' activation global scales differ"
    try:
        QuantSpec.from_format(first.act_fmt)
    except NotImplementedError as e:
        return str(e)
    if first.act_fmt.name == "nvfp4" and first.act_global_scale is None:
        return "nvfp4 activations without a calibrated global scale"
    return None


def plan(model: nnx.Module) -> dict[str, str | None]:
    """Mark the norms of `model` that quantize for their consumers (`pqjax.set_backend` calls
    this for "pallas"). Returns {norm path: None if fused, else the reason it is not}."""
    try:
        model_sites = sites(model)
    except TypeError:  # a model with no declared sites: nothing is fused
        return {}
    out: dict[str, str | None] = {}
    for site in model_sites:
        consumers = [module_at(model, c) for c in site.consumers]
        for path in site.norms:
            norm = module_at(model, path)
            if not site.direct:
                reason = "its output is transformed before the consumers"
            elif len(site.norms) != 1:
                reason = "the site has several norms"
            else:
                reason = why_not(consumers)
            norm.fuse_quant = reason is None
            # the 16-bit output is written only for a consumer whose low-rank branch (or
            # observer) reads it
            norm.fuse_dense = norm.fuse_quant and any(
                c.low_rank_down is not None or c.observer is not None for c in consumers
            )
            out[path] = reason
    return out
