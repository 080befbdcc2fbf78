"""Building blocks shared by every model port: linear, norms, activations, attention.

Conventions (every model in `pqjax.models` follows them):
- Module attribute names mirror the diffusers / transformers module tree, lists included
  (`nnx.List`), so the NNX path `transformer_blocks/0/attn/to_out/0/kernel` maps onto the torch
  key `transformer_blocks.0.attn.to_out.0.weight` by rule (see `convert.bridge`).
- Each layer class declares `TORCH_PARAMS`: its NNX parameter name -> (torch name, layout).
- Linear kernels are stored in Flax layout `(d_in, d_out)`; activations are channels-last.
- Every dense projection is a `Linear`: calibration attaches an observer to it, and
  quantization swaps it for `pqjax.layers.QuantLinear` with the same call signature.
- Norms can read their input in a permuted channel order (`perm`): that is how PermuQuant's
  permutation of a norm-fed site is absorbed with nothing permuted at run time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

# NNX param name -> (torch param name, layout). Layouts are interpreted by `convert.bridge`:
# "linear": torch (d_out, d_in) <-> flax (d_in, d_out); "conv2d": torch OIHW <-> flax HWIO;
# "same": no change.
TorchParams = dict[str, tuple[str, str]]


class Permutation(nnx.Variable):
    """Channel gather indices `(d,)` int32 that a norm applies to its input: `x[..., perm]`."""


def torch_uniform(key: jax.Array, shape: tuple[int, ...], fan_in: int, dtype: Any) -> jax.Array:
    """torch.nn.Linear / Conv default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


class Linear(nnx.Module):
    """Dense projection `y = x @ kernel + bias`.

    kernel: `(d_in, d_out)`; bias: `(d_out,)` or None. x: `(..., d_in)` -> `(..., d_out)`.
    `observer`, when set by `pqjax.calibrate`, sees every input before the product.
    """

    TORCH_PARAMS: ClassVar[TorchParams] = {"kernel": ("weight", "linear"), "bias": ("bias", "same")}

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.out_features = out_features
        key_w, key_b = jax.random.split(rngs.params())
        self.kernel = nnx.Param(
            torch_uniform(key_w, (in_features, out_features), in_features, dtype)
        )
        self.bias = nnx.data(
            nnx.Param(torch_uniform(key_b, (out_features,), in_features, dtype))
            if use_bias
            else None
        )
        self.observer = nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.observer is not None:
            self.observer(x)
        kernel = self.kernel[...]
        # Accumulated in float32 and rounded once, as torch does for bf16. Asked for plainly,
        # a bf16 product is upcast by XLA's CPU backend, which then held a float32 copy of
        # every weight of a forward at once (T5-XXL: 19 GB beside its 9.5 GB of weights).
        y = jnp.dot(x.astype(kernel.dtype), kernel, preferred_element_type=jnp.float32)
        y = y.astype(kernel.dtype)
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class Identity(nnx.Module):
    """Stands in for parameter-free torch modules (Dropout at eval) so list indices line up."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return x


def _gather(x: jax.Array, perm: Permutation | None) -> jax.Array:
    return x if perm is None else jnp.take(x, perm[...], axis=-1)


def modulate(y: jax.Array, scale: jax.Array | None, shift: jax.Array | None) -> jax.Array:
    """AdaLN modulation `y * (1 + scale) + shift`; scale, shift `(batch, d)` per batch element."""
    if scale is not None:
        y = y * (1 + scale[:, None, :])
    if shift is not None:
        y = y + shift[:, None, :]
    return y


NormRoute = Callable[..., Any]
_NORM_ROUTES: dict[str, NormRoute] = {}


def register_norm_route(backend: str, route: NormRoute) -> None:
    """Serve norms whose `backend` attribute is `backend` by `route(norm, x, scale, shift)`
    (pqjax.backends binds "pallas": the kernels, fused with quantization where planned)."""
    _NORM_ROUTES[backend] = route


def _routed_norm(norm: Any, x: jax.Array, scale: jax.Array | None, shift: jax.Array | None) -> Any:
    try:
        route = _NORM_ROUTES[norm.backend]
    except KeyError:
        raise ValueError(
            f"{type(norm).__name__}: backend {norm.backend!r} is not bound; switch backends "
            "with pqjax.set_backend(model, ...)"
        ) from None
    return route(norm, x, scale, shift)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, optionally affine, optionally reading `x[..., perm]`.

    x: `(..., d)`. Statistics in float32; the result is cast back to x's dtype.
    `__call__(x, scale, shift)` also applies AdaLN modulation (see `modulate`).
    """

    TORCH_PARAMS: ClassVar[TorchParams] = {"scale": ("weight", "same"), "bias": ("bias", "same")}

    def __init__(
        self,
        dim: int,
        *,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        use_bias: bool = True,
        dtype: Any = jnp.float32,
    ):
        self.dim = dim
        self.eps = eps
        affine = elementwise_affine
        self.scale = nnx.data(nnx.Param(jnp.ones((dim,), dtype)) if affine else None)
        self.bias = nnx.data(nnx.Param(jnp.zeros((dim,), dtype)) if affine and use_bias else None)
        self.perm = nnx.data(None)
        self.backend = "xla"  # "pallas": the fused kernel (pqjax.set_backend switches it)
        self.fuse_quant = False  # "pallas": also quantize for the consumers (fusion.plan)
        self.fuse_dense = False  # fused: also write the 16-bit output (a consumer reads it)

    def normalize(self, x: jax.Array) -> jax.Array:
        x32 = _gather(x, self.perm).astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        centered = x32 - mean
        var = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
        y = centered * jax.lax.rsqrt(var + self.eps)
        if self.scale is not None:
            y = y * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)

    def __call__(
        self, x: jax.Array, scale: jax.Array | None = None, shift: jax.Array | None = None
    ) -> jax.Array:
        if self.backend != "xla":
            return _routed_norm(self, x, scale, shift)
        return modulate(self.normalize(x), scale, shift)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis: `x * rsqrt(mean(x^2) + eps) * weight`.

    x: `(..., d)`. Optionally reads `x[..., perm]` and applies AdaLN modulation.
    """

    TORCH_PARAMS: ClassVar[TorchParams] = {"scale": ("weight", "same")}

    def __init__(
        self,
        dim: int,
        *,
        eps: float = 1e-6,
        elementwise_affine: bool = True,
        dtype: Any = jnp.float32,
    ):
        self.dim = dim
        self.eps = eps
        self.scale = nnx.data(nnx.Param(jnp.ones((dim,), dtype)) if elementwise_affine else None)
        self.perm = nnx.data(None)
        self.backend = "xla"  # "pallas": the fused kernel (pqjax.set_backend switches it)
        self.fuse_quant = False  # "pallas": also quantize for the consumers (fusion.plan)
        self.fuse_dense = False  # fused: also write the 16-bit output (a consumer reads it)

    def normalize(self, x: jax.Array) -> jax.Array:
        x32 = _gather(x, self.perm).astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        if self.scale is not None:
            y = y * self.scale[...].astype(jnp.float32)
        return y.astype(x.dtype)

    def __call__(
        self, x: jax.Array, scale: jax.Array | None = None, shift: jax.Array | None = None
    ) -> jax.Array:
        if self.backend != "xla":
            return _routed_norm(self, x, scale, shift)
        return modulate(self.normalize(x), scale, shift)


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


def silu(x: jax.Array) -> jax.Array:
    return jax.nn.silu(x)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Softmax attention with scale 1/sqrt(head_dim); softmax in float32.

    q: `(batch, q_len, heads, head_dim)`; k, v: `(batch, kv_len, heads, head_dim)`;
    mask: broadcastable to `(batch, heads, q_len, kv_len)`, True = attend.
    Returns `(batch, q_len, heads, head_dim)`.
    """
    return jax.nn.dot_product_attention(q, k, v, mask=mask)
