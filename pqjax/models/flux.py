"""FLUX.1 transformer (diffusers `FluxTransformer2DModel`) in Flax NNX.

Double-stream blocks (separate image/text weights, joint attention), single-stream blocks
(parallel attention + MLP), 3-axis RoPE, AdaLN-Zero modulation, optional guidance embedding.
The module tree mirrors diffusers' names, so checkpoints map onto it by rule.

    model = FluxTransformer2DModel(FluxConfig(num_layers=2, ...), rngs=nnx.Rngs(0))
    out = model(hidden_states=x, encoder_hidden_states=t5, pooled_projections=clip,
                timestep=t, img_ids=img_ids, txt_ids=txt_ids, guidance=g)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pqjax.models.embeddings import CombinedTimestepTextProjEmbeddings, apply_rope, rope_cos_sin
from pqjax.models.layers import Identity, LayerNorm, Linear, RMSNorm, attention, gelu_tanh
from pqjax.models.modules import (
    AdaLayerNormContinuous,
    AdaLayerNormZero,
    AdaLayerNormZeroSingle,
    FeedForward,
)


@dataclasses.dataclass(frozen=True)
class FluxConfig:
    """diffusers' FluxTransformer2DModel config; defaults are FLUX.1-dev's."""

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)

    def __post_init__(self):
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim "
                f"{self.attention_head_dim}"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


class FluxAttention(nnx.Module):
    """Joint attention. Image stream: to_q/k/v (+ to_out); text stream: add_*_proj, to_add_out.

    With `pre_only` (single blocks) there is no output projection.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        *,
        joint: bool,
        pre_only: bool,
        eps: float,
        dtype: Any,
        rngs: nnx.Rngs,
    ):
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.norm_q = RMSNorm(head_dim, eps=eps, dtype=dtype)
        self.norm_k = RMSNorm(head_dim, eps=eps, dtype=dtype)
        self.to_q = Linear(dim, inner, dtype=dtype, rngs=rngs)
        self.to_k = Linear(dim, inner, dtype=dtype, rngs=rngs)
        self.to_v = Linear(dim, inner, dtype=dtype, rngs=rngs)
        self.to_out = nnx.data(
            None if pre_only else nnx.List([Linear(inner, dim, dtype=dtype, rngs=rngs), Identity()])
        )
        self.joint = joint
        if joint:
            self.norm_added_q = RMSNorm(head_dim, eps=eps, dtype=dtype)
            self.norm_added_k = RMSNorm(head_dim, eps=eps, dtype=dtype)
            self.add_q_proj = Linear(dim, inner, dtype=dtype, rngs=rngs)
            self.add_k_proj = Linear(dim, inner, dtype=dtype, rngs=rngs)
            self.add_v_proj = Linear(dim, inner, dtype=dtype, rngs=rngs)
            self.to_add_out = Linear(inner, dim, dtype=dtype, rngs=rngs)

    def _heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:-1], -1, self.head_dim)

    def __call__(
        self,
        x: jax.Array,
        context: jax.Array | None,
        rope: tuple[jax.Array, jax.Array],
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """x: `(b, n_img, dim)`; context: `(b, n_txt, dim)` or None; rope over `[txt; img]`."""
        q = self.norm_q(self._heads(self.to_q(x)))
        k = self.norm_k(self._heads(self.to_k(x)))
        v = self._heads(self.to_v(x))
        if context is not None:
            cq = self.norm_added_q(self._heads(self.add_q_proj(context)))
            ck = self.norm_added_k(self._heads(self.add_k_proj(context)))
            cv = self._heads(self.add_v_proj(context))
            q, k, v = (jnp.concatenate(p, axis=1) for p in ((cq, q), (ck, k), (cv, v)))
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attention(q, k, v).astype(q.dtype)
        out = out.reshape(*out.shape[:2], -1)
        if context is None:
            return out
        n_txt = context.shape[1]
        ctx_out, img_out = out[:, :n_txt], out[:, n_txt:]
        return self.to_out[0](img_out), self.to_add_out(ctx_out)


class FluxTransformerBlock(nnx.Module):
    """Double-stream block: separate AdaLN/FFN per stream, one joint attention."""

    def __init__(self, dim: int, heads: int, head_dim: int, *, dtype: Any, rngs: nnx.Rngs):
        self.norm1 = AdaLayerNormZero(dim, dtype=dtype, rngs=rngs)
        self.norm1_context = AdaLayerNormZero(dim, dtype=dtype, rngs=rngs)
        self.attn = FluxAttention(
            dim, heads, head_dim, joint=True, pre_only=False, eps=1e-6, dtype=dtype, rngs=rngs
        )
        self.norm2 = LayerNorm(dim, eps=1e-6, elementwise_affine=False, dtype=dtype)
        self.ff = FeedForward(dim, dim, dtype=dtype, rngs=rngs)
        self.norm2_context = LayerNorm(dim, eps=1e-6, elementwise_affine=False, dtype=dtype)
        self.ff_context = FeedForward(dim, dim, dtype=dtype, rngs=rngs)

    def __call__(
        self, x: jax.Array, context: jax.Array, temb: jax.Array, rope: tuple[jax.Array, jax.Array]
    ) -> tuple[jax.Array, jax.Array]:
        """x: `(b, n_img, dim)`, context: `(b, n_txt, dim)`, temb: `(b, dim)`."""
        nx, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, temb)
        nc, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(context, temb)
        attn_out, ctx_attn_out = self.attn(nx, nc, rope)
        x = x + gate_msa[:, None] * attn_out
        x = x + gate_mlp[:, None] * self.ff(self.norm2(x, scale_mlp, shift_mlp))
        context = context + c_gate_msa[:, None] * ctx_attn_out
        ff_ctx = self.ff_context(self.norm2_context(context, c_scale_mlp, c_shift_mlp))
        context = context + c_gate_mlp[:, None] * ff_ctx
        if context.dtype == jnp.float16:
            context = jnp.clip(context, -65504, 65504)
        return context, x


class FluxSingleTransformerBlock(nnx.Module):
    """Single-stream block over `[txt; img]`: proj_out(concat(attention, gelu(proj_mlp)))."""

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        *,
        mlp_ratio: float = 4.0,
        dtype: Any,
        rngs: nnx.Rngs,
    ):
        self.mlp_hidden_dim = int(dim * mlp_ratio)
        self.norm = AdaLayerNormZeroSingle(dim, dtype=dtype, rngs=rngs)
        self.proj_mlp = Linear(dim, self.mlp_hidden_dim, dtype=dtype, rngs=rngs)
        self.proj_out = Linear(dim + self.mlp_hidden_dim, dim, dtype=dtype, rngs=rngs)
        self.attn = FluxAttention(
            dim, heads, head_dim, joint=False, pre_only=True, eps=1e-6, dtype=dtype, rngs=rngs
        )

    def __call__(
        self, x: jax.Array, context: jax.Array, temb: jax.Array, rope: tuple[jax.Array, jax.Array]
    ) -> tuple[jax.Array, jax.Array]:
        n_txt = context.shape[1]
        h = jnp.concatenate([context, x], axis=1)
        nh, gate = self.norm(h, temb)
        mlp = gelu_tanh(self.proj_mlp(nh))
        attn_out = self.attn(nh, None, rope)
        h = h + gate[:, None] * self.proj_out(jnp.concatenate([attn_out, mlp], axis=-1))
        if h.dtype == jnp.float16:
            h = jnp.clip(h, -65504, 65504)
        return h[:, :n_txt], h[:, n_txt:]


class FluxTransformer2DModel(nnx.Module):
    """The FLUX.1 transformer. Parameters in `dtype`; see module docstring for the call."""

    def __init__(self, config: FluxConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        c = config
        dim, heads, hd = c.inner_dim, c.num_attention_heads, c.attention_head_dim
        self.out_channels = c.out_channels or c.in_channels
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(
            dim, c.pooled_projection_dim, guidance_embeds=c.guidance_embeds, dtype=dtype, rngs=rngs
        )
        self.context_embedder = Linear(c.joint_attention_dim, dim, dtype=dtype, rngs=rngs)
        self.x_embedder = Linear(c.in_channels, dim, dtype=dtype, rngs=rngs)
        self.transformer_blocks = nnx.List(
            [
                FluxTransformerBlock(dim, heads, hd, dtype=dtype, rngs=rngs)
                for _ in range(c.num_layers)
            ]
        )
        self.single_transformer_blocks = nnx.List(
            [
                FluxSingleTransformerBlock(dim, heads, hd, dtype=dtype, rngs=rngs)
                for _ in range(c.num_single_layers)
            ]
        )
        self.norm_out = AdaLayerNormContinuous(
            dim, dim, elementwise_affine=False, eps=1e-6, dtype=dtype, rngs=rngs
        )
        out_dim = c.patch_size * c.patch_size * self.out_channels
        self.proj_out = Linear(dim, out_dim, dtype=dtype, rngs=rngs)

    def embed(
        self,
        hidden_states: jax.Array,
        encoder_hidden_states: jax.Array,
        pooled_projections: jax.Array,
        timestep: jax.Array,
        img_ids: jax.Array,
        txt_ids: jax.Array,
        guidance: jax.Array | None,
    ) -> tuple[jax.Array, jax.Array, jax.Array, tuple[jax.Array, jax.Array]]:
        """Input embeddings: (x, context, temb, rope) as the blocks consume them."""
        x = self.x_embedder(hidden_states)
        t = timestep.astype(x.dtype) * 1000
        g = None if guidance is None else guidance.astype(x.dtype) * 1000
        temb = self.time_text_embed(t, g, pooled_projections)
        context = self.context_embedder(encoder_hidden_states)
        # diffusers accepts (1, seq, 3) ids with a deprecation warning; the batch axis is dropped.
        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        ids = jnp.concatenate([txt_ids, img_ids], axis=0)
        rope = rope_cos_sin(ids, self.config.axes_dims_rope, theta=10000.0)
        return x, context, temb, rope

    def __call__(
        self,
        hidden_states: jax.Array,
        encoder_hidden_states: jax.Array,
        pooled_projections: jax.Array,
        timestep: jax.Array,
        img_ids: jax.Array,
        txt_ids: jax.Array,
        guidance: jax.Array | None = None,
    ) -> jax.Array:
        """diffusers' forward, same meaning and scaling.

        hidden_states: `(b, n_img, in_channels)` packed latents; encoder_hidden_states:
        `(b, n_txt, joint_attention_dim)`; pooled_projections: `(b, pooled_dim)`;
        timestep, guidance: `(b,)` in [0, 1] (scaled by 1000 inside); img_ids: `(n_img, 3)`;
        txt_ids: `(n_txt, 3)`. Returns `(b, n_img, patch^2 * out_channels)`.
        """
        x, context, temb, rope = self.embed(
            hidden_states,
            encoder_hidden_states,
            pooled_projections,
            timestep,
            img_ids,
            txt_ids,
            guidance,
        )
        for block in self.transformer_blocks:
            context, x = block(x, context, temb, rope)
        for block in self.single_transformer_blocks:
            context, x = block(x, context, temb, rope)
        return self.proj_out(self.norm_out(x, temb))
