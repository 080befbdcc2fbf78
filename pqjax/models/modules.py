"""diffusers' shared DiT modules: AdaLN-Zero variants and the GELU feed-forward.

The AdaLN linears emit their modulation vectors as consecutive chunks of `dim` columns; the
chunk order is part of the checkpoint format and of the permutation sites, so it is listed
on each class as `CHUNKS`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
from flax import nnx

from pqjax.models.layers import Identity, LayerNorm, Linear, gelu, gelu_tanh, silu


class AdaLayerNormZero(nnx.Module):
    """adaLN-Zero: `linear(silu(emb))` -> 6 chunks; returns the msa-modulated norm and the rest.

    x: `(batch, seq, dim)`, emb: `(batch, dim)`.
    """

    CHUNKS: ClassVar[tuple[str, ...]] = (
        "shift_msa",
        "scale_msa",
        "gate_msa",
        "shift_mlp",
        "scale_mlp",
        "gate_mlp",
    )

    def __init__(self, dim: int, *, dtype: Any, rngs: nnx.Rngs):
        self.linear = Linear(dim, 6 * dim, dtype=dtype, rngs=rngs)
        self.norm = LayerNorm(dim, eps=1e-6, elementwise_affine=False, dtype=dtype)

    def __call__(self, x: jax.Array, emb: jax.Array) -> tuple[jax.Array, ...]:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jax.numpy.split(
            self.linear(silu(emb)), 6, axis=-1
        )
        return self.norm(x, scale_msa, shift_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormZeroSingle(nnx.Module):
    """adaLN-Zero for single-stream blocks: 3 chunks (shift, scale, gate)."""

    CHUNKS: ClassVar[tuple[str, ...]] = ("shift_msa", "scale_msa", "gate_msa")

    def __init__(self, dim: int, *, dtype: Any, rngs: nnx.Rngs):
        self.linear = Linear(dim, 3 * dim, dtype=dtype, rngs=rngs)
        self.norm = LayerNorm(dim, eps=1e-6, elementwise_affine=False, dtype=dtype)

    def __call__(self, x: jax.Array, emb: jax.Array) -> tuple[jax.Array, jax.Array]:
        shift, scale, gate = jax.numpy.split(self.linear(silu(emb)), 3, axis=-1)
        return self.norm(x, scale, shift), gate


class AdaLayerNormContinuous(nnx.Module):
    """Final-layer AdaLN: `linear(silu(cond))` -> (scale, shift), note the order."""

    CHUNKS: ClassVar[tuple[str, ...]] = ("scale", "shift")

    def __init__(
        self,
        dim: int,
        cond_dim: int,
        *,
        elementwise_affine: bool,
        eps: float,
        dtype: Any,
        rngs: nnx.Rngs,
    ):
        self.linear = Linear(cond_dim, 2 * dim, dtype=dtype, rngs=rngs)
        self.norm = LayerNorm(dim, eps=eps, elementwise_affine=elementwise_affine, dtype=dtype)

    def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
        scale, shift = jax.numpy.split(self.linear(silu(cond).astype(x.dtype)), 2, axis=-1)
        return self.norm(x, scale, shift)


class GELUProjection(nnx.Module):
    """diffusers `GELU`: `gelu(proj(x))`, tanh-approximate or exact."""

    def __init__(self, dim_in: int, dim_out: int, *, approximate: bool, dtype: Any, rngs: nnx.Rngs):
        self.proj = Linear(dim_in, dim_out, dtype=dtype, rngs=rngs)
        self.approximate = approximate

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.proj(x)
        return gelu_tanh(h) if self.approximate else gelu(h)


class FeedForward(nnx.Module):
    """diffusers `FeedForward`: `net = [GELU(dim -> inner), Dropout, Linear(inner -> dim_out)]`."""

    def __init__(
        self,
        dim: int,
        dim_out: int,
        *,
        mult: float = 4.0,
        approximate: bool = True,
        dtype: Any,
        rngs: nnx.Rngs,
    ):
        inner = int(dim * mult)
        self.net = nnx.List(
            [
                GELUProjection(dim, inner, approximate=approximate, dtype=dtype, rngs=rngs),
                Identity(),
                Linear(inner, dim_out, dtype=dtype, rngs=rngs),
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.net:
            x = layer(x)
        return x
