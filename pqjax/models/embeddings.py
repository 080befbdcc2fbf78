"""Timestep, guidance, pooled-text and rotary position embeddings (diffusers' definitions)."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pqjax.models.layers import Linear, silu


@functools.lru_cache(maxsize=16)
def sinusoid_frequencies(half: int, max_period: float, shift: float) -> np.ndarray:
    """`exp(-log(max_period) * i / (half - shift))` `(half,)` float32, computed on the host.

    torch's float32 exponent, then a correctly rounded exp: at timestep * 1000 (~1e3 rad) one
    ulp of a frequency moves sin by ~6e-5, and XLA's expf differs from torch's in ~1 of 8
    entries; a constant table removes that source of mismatch on every backend.
    """
    arg = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
    arg = arg / np.float32(half - shift)
    return np.exp(arg.astype(np.float64)).astype(np.float32)


def timestep_embedding(
    timesteps: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> jax.Array:
    """Sinusoidal embedding of fractional timesteps. timesteps: `(n,)` -> `(n, dim)` float32."""
    half = dim // 2
    freqs = jnp.asarray(sinusoid_frequencies(half, float(max_period), float(downscale_freq_shift)))
    args = scale * (timesteps.astype(jnp.float32)[:, None] * freqs[None, :])
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    """`linear_2(silu(linear_1(x)))`: x `(n, in_channels)` -> `(n, dim)`."""

    def __init__(self, in_channels: int, dim: int, *, dtype: Any, rngs: nnx.Rngs):
        self.linear_1 = Linear(in_channels, dim, dtype=dtype, rngs=rngs)
        self.linear_2 = Linear(dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(silu(self.linear_1(x)))


class TextProjection(nnx.Module):
    """PixArt-alpha caption projection with SiLU: `(n, in_features)` -> `(n, dim)`."""

    def __init__(self, in_features: int, dim: int, *, dtype: Any, rngs: nnx.Rngs):
        self.linear_1 = Linear(in_features, dim, dtype=dtype, rngs=rngs)
        self.linear_2 = Linear(dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(silu(self.linear_1(x)))


class CombinedTimestepTextProjEmbeddings(nnx.Module):
    """temb = MLP(sinusoid(t)) [+ MLP(sinusoid(guidance))] + MLP(pooled text)."""

    def __init__(
        self,
        dim: int,
        pooled_projection_dim: int,
        *,
        guidance_embeds: bool,
        dtype: Any,
        rngs: nnx.Rngs,
    ):
        self.timestep_embedder = TimestepEmbedding(256, dim, dtype=dtype, rngs=rngs)
        self.guidance_embedder = nnx.data(
            TimestepEmbedding(256, dim, dtype=dtype, rngs=rngs) if guidance_embeds else None
        )
        self.text_embedder = TextProjection(pooled_projection_dim, dim, dtype=dtype, rngs=rngs)

    def __call__(
        self, timestep: jax.Array, guidance: jax.Array | None, pooled: jax.Array
    ) -> jax.Array:
        """timestep, guidance: `(batch,)` already scaled by 1000; pooled: `(batch, pooled_dim)`."""
        temb = self.timestep_embedder(timestep_embedding(timestep, 256).astype(pooled.dtype))
        if self.guidance_embedder is not None:
            if guidance is None:
                raise ValueError("this model has guidance embeddings: pass `guidance` (batch,)")
            g = timestep_embedding(guidance, 256).astype(pooled.dtype)
            temb = temb + self.guidance_embedder(g)
        return temb + self.text_embedder(pooled)


def rope_frequencies(axes_dim: Sequence[int], theta: float) -> tuple[np.ndarray, ...]:
    """Per-axis inverse frequencies `theta^(-2i/d)`, computed in float64 like diffusers."""
    return tuple(
        (1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)).astype(np.float32)
        for d in axes_dim
    )


def rope_cos_sin(
    ids: jax.Array, axes_dim: Sequence[int], theta: float
) -> tuple[jax.Array, jax.Array]:
    """FLUX's multi-axis RoPE tables. ids: `(seq, n_axes)` -> cos, sin `(seq, sum(axes_dim))`.

    Each frequency is repeated twice (interleaved real/imaginary pairs).
    """
    if ids.shape[-1] != len(axes_dim):
        raise ValueError(f"ids has {ids.shape[-1]} axes but axes_dims_rope has {len(axes_dim)}")
    pos = ids.astype(jnp.float32)
    angles = [
        pos[:, i : i + 1] * jnp.asarray(f)[None, :]
        for i, f in enumerate(rope_frequencies(axes_dim, theta))
    ]
    angle = jnp.repeat(jnp.concatenate(angles, axis=-1), 2, axis=-1)
    return jnp.cos(angle), jnp.sin(angle)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs. x: `(batch, seq, heads, head_dim)`; cos, sin: `(seq, head_dim)`."""
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    out = x.astype(jnp.float32) * cos[None, :, None, :] + rotated * sin[None, :, None, :]
    return out.astype(x.dtype)
