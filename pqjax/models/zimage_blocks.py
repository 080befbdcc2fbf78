"""Z-Image building blocks (diffusers `transformer_z_image.py`): sandwich-norm DiT block,
single-stream attention with per-head q/k RMSNorm, SwiGLU feed-forward, 3-axis RoPE tables,
timestep embedder and final layer.

Module and attribute names mirror diffusers, so `convert.bridge` maps checkpoints by rule:
`layers.3.attention.to_out.0.weight`, `layers.3.feed_forward.w1.weight`,
`layers.3.adaLN_modulation.0.weight` (a one-entry nn.Sequential), `t_embedder.mlp.2.weight`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pqjax.models.embeddings import timestep_embedding
from pqjax.models.layers import Identity, LayerNorm, Linear, RMSNorm, attention, silu

# diffusers' module constants: width of the timestep embedding fed to every AdaLN linear, and
# the granularity every image / caption sequence is padded to (with learned pad tokens).
ADALN_EMBED_DIM = 256
SEQ_MULTI_OF = 32
FREQ_EMBED_DIM = 256
T_EMBED_MID = 1024


def ffn_hidden(dim: int) -> int:
    """The SwiGLU hidden width of a block of width `dim` (diffusers: int(dim / 3 * 8))."""
    return int(dim / 3 * 8)


def round_up(n: Any, multiple: int = SEQ_MULTI_OF) -> Any:
    """Smallest multiple of `multiple` >= n; works on ints and integer arrays."""
    return (n + multiple - 1) // multiple * multiple


class SiLU(nnx.Module):
    """torch.nn.SiLU inside an nn.Sequential: no parameters, keeps the list indices aligned."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return silu(x)


def run_sequential(layers: nnx.List, x: jax.Array) -> jax.Array:
    for layer in layers:
        x = layer(x)
    return x


class TimestepEmbedder(nnx.Module):
    """`mlp = [Linear(256 -> mid), SiLU, Linear(mid -> out)]` over a cos-first sinusoid.

    t: `(batch,)` already multiplied by `t_scale` -> `(batch, out_size)`.
    """

    def __init__(self, out_size: int, mid_size: int, *, dtype: Any, rngs: nnx.Rngs):
        self.mlp = nnx.List(
            [
                Linear(FREQ_EMBED_DIM, mid_size, dtype=dtype, rngs=rngs),
                SiLU(),
                Linear(mid_size, out_size, dtype=dtype, rngs=rngs),
            ]
        )

    def __call__(self, t: jax.Array) -> jax.Array:
        emb = timestep_embedding(t, FREQ_EMBED_DIM)  # [cos, sin], no shift
        return run_sequential(self.mlp, emb.astype(self.mlp[0].kernel.dtype))


@functools.lru_cache(maxsize=16)
def rope_tables(
    axes_dims: tuple[int, ...], axes_lens: tuple[int, ...], theta: float
) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Per axis `(cos, sin)` tables `(axes_lens[i], axes_dims[i] // 2)` float32.

    As diffusers' RopeEmbedder: angles `pos * theta^(-2j/d)` in float64, rounded to float32,
    then cos/sin of the float32 angle.
    """
    tables = []
    for d, n in zip(axes_dims, axes_lens, strict=True):
        freqs = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
        angle = np.outer(np.arange(n, dtype=np.float64), freqs).astype(np.float32)
        a64 = angle.astype(np.float64)
        tables.append((np.cos(a64).astype(np.float32), np.sin(a64).astype(np.float32)))
    return tuple(tables)


def rope_cos_sin(
    ids: jax.Array, axes_dims: Sequence[int], axes_lens: Sequence[int], theta: float
) -> tuple[jax.Array, jax.Array]:
    """ids: `(..., n_axes)` integer positions -> cos, sin `(..., sum(axes_dims))` float32.

    Each frequency is repeated for its interleaved (real, imaginary) pair. A position outside
    `[0, axes_lens[i])` yields NaN (diffusers raises an index error there).
    """
    tables = rope_tables(tuple(axes_dims), tuple(axes_lens), float(theta))
    cos, sin = [], []
    for i, (c, s) in enumerate(tables):
        idx = ids[..., i].astype(jnp.int32)
        cos.append(jnp.take(jnp.asarray(c), idx, axis=0, mode="fill", fill_value=jnp.nan))
        sin.append(jnp.take(jnp.asarray(s), idx, axis=0, mode="fill", fill_value=jnp.nan))
    cos_all = jnp.repeat(jnp.concatenate(cos, axis=-1), 2, axis=-1)
    sin_all = jnp.repeat(jnp.concatenate(sin, axis=-1), 2, axis=-1)
    return cos_all, sin_all


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Complex rotation of interleaved pairs, in float32.

    x: `(batch, seq, heads, head_dim)`; cos, sin: `(batch, seq, head_dim)` (per-token positions).
    """
    x32 = x.astype(jnp.float32)
    pairs = x32.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


class ZImageAttention(nnx.Module):
    """diffusers `Attention` + `ZSingleStreamAttnProcessor`: self-attention over one sequence.

    to_q/k/v (no bias) -> per-head RMSNorm (eps 1e-5, when qk_norm) -> RoPE -> masked softmax
    attention -> `to_out = [Linear (no bias), Dropout]`.
    """

    def __init__(self, dim: int, heads: int, *, qk_norm: bool, dtype: Any, rngs: nnx.Rngs):
        self.heads = heads
        self.head_dim = dim // heads
        inner = heads * self.head_dim
        self.to_q = Linear(dim, inner, use_bias=False, dtype=dtype, rngs=rngs)
        self.to_k = Linear(dim, inner, use_bias=False, dtype=dtype, rngs=rngs)
        self.to_v = Linear(dim, inner, use_bias=False, dtype=dtype, rngs=rngs)
        # diffusers passes eps=1e-5 to the q/k norms whatever the model's norm_eps.
        self.norm_q = nnx.data(RMSNorm(self.head_dim, eps=1e-5, dtype=dtype) if qk_norm else None)
        self.norm_k = nnx.data(RMSNorm(self.head_dim, eps=1e-5, dtype=dtype) if qk_norm else None)
        out = Linear(inner, dim, use_bias=False, dtype=dtype, rngs=rngs)
        self.to_out = nnx.List([out, Identity()])

    def _heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:-1], self.heads, self.head_dim)

    def __call__(
        self, x: jax.Array, mask: jax.Array, rope: tuple[jax.Array, jax.Array]
    ) -> jax.Array:
        """x: `(b, s, dim)`; mask: `(b, s)`, True = key attended; rope: cos, sin `(b, s, hd)`."""
        q, k, v = self._heads(self.to_q(x)), self._heads(self.to_k(x)), self._heads(self.to_v(x))
        if self.norm_q is not None:
            q = self.norm_q(q)
        if self.norm_k is not None:
            k = self.norm_k(k)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attention(q, k, v, mask[:, None, None, :]).astype(q.dtype)
        out = out.reshape(*out.shape[:2], -1)
        return self.to_out[1](self.to_out[0](out))


class ZImageFeedForward(nnx.Module):
    """SwiGLU: `w2(silu(w1 x) * w3 x)`, all without bias. x: `(..., dim)` -> `(..., dim)`."""

    def __init__(self, dim: int, hidden_dim: int, *, dtype: Any, rngs: nnx.Rngs):
        self.w1 = Linear(dim, hidden_dim, use_bias=False, dtype=dtype, rngs=rngs)
        self.w2 = Linear(hidden_dim, dim, use_bias=False, dtype=dtype, rngs=rngs)
        self.w3 = Linear(dim, hidden_dim, use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.w2(silu(self.w1(x)) * self.w3(x))


class ZImageTransformerBlock(nnx.Module):
    """Sandwich-norm block. With modulation (noise refiner, main layers):

        x += tanh(gate_msa) * attention_norm2(attention(attention_norm1(x) * (1 + scale_msa)))
        x += tanh(gate_mlp) * ffn_norm2(feed_forward(ffn_norm1(x) * (1 + scale_mlp)))

    where `adaLN_modulation.0(adaln)` (no SiLU in front) emits the `CHUNKS` in order. Without
    modulation (context refiner) scales are 1 and gates are 1.
    """

    CHUNKS: ClassVar[tuple[str, ...]] = ("scale_msa", "gate_msa", "scale_mlp", "gate_mlp")

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        norm_eps: float,
        qk_norm: bool,
        modulation: bool,
        dtype: Any,
        rngs: nnx.Rngs,
    ):
        self.attention = ZImageAttention(dim, heads, qk_norm=qk_norm, dtype=dtype, rngs=rngs)
        self.feed_forward = ZImageFeedForward(dim, ffn_hidden(dim), dtype=dtype, rngs=rngs)
        self.attention_norm1 = RMSNorm(dim, eps=norm_eps, dtype=dtype)
        self.ffn_norm1 = RMSNorm(dim, eps=norm_eps, dtype=dtype)
        self.attention_norm2 = RMSNorm(dim, eps=norm_eps, dtype=dtype)
        self.ffn_norm2 = RMSNorm(dim, eps=norm_eps, dtype=dtype)
        adaln_dim = min(dim, ADALN_EMBED_DIM)
        self.adaLN_modulation = nnx.data(
            nnx.List([Linear(adaln_dim, 4 * dim, dtype=dtype, rngs=rngs)]) if modulation else None
        )

    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array,
        rope: tuple[jax.Array, jax.Array],
        adaln: jax.Array | None = None,
    ) -> jax.Array:
        """x: `(b, s, dim)`; mask: `(b, s)`; adaln: `(b, min(dim, 256))`, only with modulation."""
        scale_msa = gate_msa = scale_mlp = gate_mlp = None
        if self.adaLN_modulation is not None:
            if adaln is None:
                raise ValueError("this block has AdaLN modulation: pass `adaln` (batch, adaln_dim)")
            mod = run_sequential(self.adaLN_modulation, adaln)
            scale_msa, gate_msa, scale_mlp, gate_mlp = jnp.split(mod, 4, axis=-1)
            gate_msa, gate_mlp = jnp.tanh(gate_msa)[:, None], jnp.tanh(gate_mlp)[:, None]
        h = self.attention_norm2(self.attention(self.attention_norm1(x, scale_msa), mask, rope))
        x = x + (h if gate_msa is None else gate_msa * h)
        h = self.ffn_norm2(self.feed_forward(self.ffn_norm1(x, scale_mlp)))
        return x + (h if gate_mlp is None else gate_mlp * h)


class FinalLayer(nnx.Module):
    """`linear(norm_final(x) * (1 + adaLN_modulation(c)))`; adaLN_modulation = [SiLU, Linear].

    LayerNorm without affine, eps 1e-6; there is no shift. x: `(b, s, hidden)`, c: `(b, adaln)`.
    """

    CHUNKS: ClassVar[tuple[str, ...]] = ("scale",)

    def __init__(self, hidden: int, out_channels: int, *, dtype: Any, rngs: nnx.Rngs):
        self.norm_final = LayerNorm(hidden, eps=1e-6, elementwise_affine=False, dtype=dtype)
        self.linear = Linear(hidden, out_channels, dtype=dtype, rngs=rngs)
        adaln_dim = min(hidden, ADALN_EMBED_DIM)
        linear = Linear(adaln_dim, hidden, dtype=dtype, rngs=rngs)
        self.adaLN_modulation = nnx.List([SiLU(), linear])

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        scale = run_sequential(self.adaLN_modulation, c)
        return self.linear(self.norm_final(x, scale))


def patchify(latents: jax.Array, p: int, pf: int) -> jax.Array:
    """`(B, C, F, H, W)` -> `(B, F/pf * H/p * W/p, pf * p * p * C)`, tokens in (f, h, w) order."""
    b, c, f, h, w = latents.shape
    x = latents.reshape(b, c, f // pf, pf, h // p, p, w // p, p)
    x = x.transpose(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(b, (f // pf) * (h // p) * (w // p), pf * p * p * c)


def unpatchify(tokens: jax.Array, size: tuple[int, int, int], p: int, pf: int) -> jax.Array:
    """`(B, >= n, pf * p * p * C)` -> `(B, C, F, H, W)`, reading the first n = F/pf*H/p*W/p."""
    f, h, w = size
    b = tokens.shape[0]
    ft, ht, wt = f // pf, h // p, w // p
    x = tokens[:, : ft * ht * wt].reshape(b, ft, ht, wt, pf, p, p, -1)
    x = x.transpose(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, x.shape[1], f, h, w)


def grid_ids(ft: int, ht: int, wt: int) -> np.ndarray:
    """`(ft * ht * wt, 3)` int32 (f, h, w) coordinates in token order."""
    grids = np.meshgrid(np.arange(ft), np.arange(ht), np.arange(wt), indexing="ij")
    return np.stack(grids, axis=-1).reshape(-1, 3).astype(np.int32)
