"""SANA transformer blocks (diffusers `SanaTransformerBlock`): linear self-attention, softmax
cross-attention to the caption, Mix-FFN (`GLUMBConv`), AdaLN-single modulation.

Module and attribute names mirror diffusers', so `convert.bridge` maps checkpoints by rule.
Activations are channels-last: tokens `(b, n, dim)`, the Mix-FFN's spatial view `(b, h, w, c)`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from pqjax.models.conv import Conv2d, PointwiseConv
from pqjax.models.layers import Identity, LayerNorm, Linear, RMSNorm, silu

# diffusers' `Attention` default eps, used by its q/k RMSNorms.
QK_NORM_EPS = 1e-5
# diffusers adds this to the linear-attention denominator (a row of ones padded onto V).
LINEAR_ATTN_EPS = 1e-15


def linear_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """ReLU-kernel linear attention, all in float32 as diffusers' `SanaLinearAttnProcessor2_0`.

    q, k, v: `(b, n, heads, head_dim)`. Returns `(b, n, heads, head_dim)` float32:
    `out_n = sum_m v_m (k_m . q_n) / (sum_m k_m . q_n + 1e-15)` with q, k passed through ReLU.
    """
    q = jax.nn.relu(q).astype(jnp.float32)
    k = jax.nn.relu(k).astype(jnp.float32)
    v = v.astype(jnp.float32)
    # A channel of ones on V makes the same product also yield the normalizer, as in diffusers.
    v1 = jnp.concatenate([v, jnp.ones((*v.shape[:-1], 1), jnp.float32)], axis=-1)
    kv = jnp.einsum("bmhd,bmhe->bhde", k, v1)
    out = jnp.einsum("bnhd,bhde->bnhe", q, kv)
    return out[..., :-1] / (out[..., -1:] + LINEAR_ATTN_EPS)


class SanaAttention(nnx.Module):
    """diffusers `Attention` as SANA builds it: to_q/to_k/to_v, optional q/k RMSNorm across heads,
    `to_out = [Linear, Dropout]`.

    `linear=True`: self-attention with the ReLU linear kernel (`attn1`); otherwise softmax
    attention of the query tokens to a context (`attn2`) with an additive key bias.
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int,
        heads: int,
        head_dim: int,
        *,
        linear: bool,
        qk_norm: bool,
        bias: bool,
        out_bias: bool = True,
        dtype: Any,
        rngs: nnx.Rngs,
    ):
        inner = heads * head_dim
        self.heads, self.head_dim, self.linear = heads, head_dim, linear
        self.norm_q = nnx.data(RMSNorm(inner, eps=QK_NORM_EPS, dtype=dtype) if qk_norm else None)
        self.norm_k = nnx.data(RMSNorm(inner, eps=QK_NORM_EPS, dtype=dtype) if qk_norm else None)
        self.to_q = Linear(query_dim, inner, use_bias=bias, dtype=dtype, rngs=rngs)
        self.to_k = Linear(context_dim, inner, use_bias=bias, dtype=dtype, rngs=rngs)
        self.to_v = Linear(context_dim, inner, use_bias=bias, dtype=dtype, rngs=rngs)
        self.to_out = nnx.List(
            [Linear(inner, query_dim, use_bias=out_bias, dtype=dtype, rngs=rngs), Identity()]
        )

    def _heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:-1], self.heads, self.head_dim)

    def __call__(
        self, x: jax.Array, context: jax.Array | None = None, bias: jax.Array | None = None
    ) -> jax.Array:
        """x: `(b, n, query_dim)`; context: `(b, s, context_dim)` (None: x); bias: additive key
        bias `(b, 1 or n, s)` (softmax attention only). Returns `(b, n, query_dim)`.
        """
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        if self.linear:
            out = linear_attention(q, k, v)
        else:
            out = jax.nn.dot_product_attention(
                q, k, v, bias=None if bias is None else bias[:, None].astype(jnp.float32)
            )
        out = out.reshape(*out.shape[:2], -1).astype(x.dtype)
        out = self.to_out[1](self.to_out[0](out))
        if self.linear and out.dtype == jnp.float16:
            out = jnp.clip(out, -65504, 65504)
        return out


class GLUMBConv(nnx.Module):
    """SANA's Mix-FFN: 1x1 conv -> SiLU -> depthwise 3x3 conv -> GLU -> 1x1 conv (no residual).

    `conv_inverted` emits `2 * hidden` channels `[x; gate]`; after the depthwise conv the GLU is
    `x * silu(gate)` (the first half is the value, the second the gate). The 1x1 convs are
    `PointwiseConv` linears (quantized); the depthwise conv stays a 16-bit `Conv2d`.
    x: `(b, h, w, in)` -> `(b, h, w, out)`.
    """

    def __init__(
        self, in_channels: int, out_channels: int, expand_ratio: float, *, dtype: Any,
        rngs: nnx.Rngs,
    ):
        hidden = int(expand_ratio * in_channels)
        self.hidden = hidden
        self.conv_inverted = PointwiseConv(in_channels, 2 * hidden, dtype=dtype, rngs=rngs)
        self.conv_depth = Conv2d(
            2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden, dtype=dtype, rngs=rngs
        )
        self.conv_point = PointwiseConv(
            hidden, out_channels, use_bias=False, dtype=dtype, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv_depth(silu(self.conv_inverted(x)))
        value, gate = h[..., : self.hidden], h[..., self.hidden :]
        return self.conv_point(value * silu(gate))


class SanaTransformerBlock(nnx.Module):
    """One SANA block: AdaLN-single-modulated linear self-attention, unmodulated cross-attention
    on the raw residual stream (no norm feeds `attn2`), modulated Mix-FFN.

    `scale_shift_table` `(6, dim)` rows are added to the shared `time_embed` output; row order
    is `CHUNKS`.
    """

    CHUNKS: ClassVar[tuple[str, ...]] = (
        "shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp"
    )

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        *,
        cross_heads: int,
        cross_head_dim: int,
        cross_attention_dim: int,
        attention_bias: bool,
        norm_elementwise_affine: bool,
        norm_eps: float,
        mlp_ratio: float,
        qk_norm: bool,
        dtype: Any,
        rngs: nnx.Rngs,
    ):
        self.norm1 = LayerNorm(dim, eps=norm_eps, elementwise_affine=False, dtype=dtype)
        self.attn1 = SanaAttention(
            dim, dim, heads, head_dim, linear=True, qk_norm=qk_norm, bias=attention_bias,
            dtype=dtype, rngs=rngs,
        )
        self.norm2 = LayerNorm(
            dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine, dtype=dtype
        )
        self.attn2 = SanaAttention(
            dim, cross_attention_dim, cross_heads, cross_head_dim, linear=False, qk_norm=qk_norm,
            bias=True, dtype=dtype, rngs=rngs,
        )
        self.ff = GLUMBConv(dim, dim, mlp_ratio, dtype=dtype, rngs=rngs)
        key = rngs.params()
        self.scale_shift_table = nnx.Param(
            (jax.random.normal(key, (6, dim), jnp.float32) / dim**0.5).astype(dtype)
        )

    def _shared_chunk(self, chunk: jax.Array, i: int) -> jax.Array:
        """Chunk i `(b, dim)` of the shared `time_embed` output, in the order its norm reads.

        A permutation absorbed into norm1 / norm2 (`norm.perm`) permutes this block's table rows
        offline, but the AdaLN-single vector is shared by every block, so its shift and scale
        chunks are gathered here (a `(b, dim)` gather per chunk); the gates stay in stream order.
        """
        norm = (self.norm1, self.norm1, None, self.norm2, self.norm2, None)[i]
        if norm is None or norm.perm is None:
            return chunk
        return jnp.take(chunk, norm.perm[...], axis=-1)

    def __call__(
        self,
        x: jax.Array,
        context: jax.Array,
        context_bias: jax.Array | None,
        temb: jax.Array,
        height: int,
        width: int,
    ) -> jax.Array:
        """x: `(b, height*width, dim)` row-major tokens; context: `(b, s, dim)`;
        context_bias: `(b, 1, s)` additive or None; temb: `(b, 6*dim)` from `time_embed`.
        """
        b = x.shape[0]
        table, shared = self.scale_shift_table[...], temb.reshape(b, 6, -1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            table[i][None] + self._shared_chunk(shared[:, i], i) for i in range(6)
        )
        nx = self.norm1(x, scale_msa, shift_msa).astype(x.dtype)
        x = x + gate_msa[:, None] * self.attn1(nx)
        x = x + self.attn2(x, context, context_bias)
        nx = self.norm2(x, scale_mlp, shift_mlp)
        ff = self.ff(nx.reshape(b, height, width, -1)).reshape(b, height * width, -1)
        return x + gate_mlp[:, None] * ff
