"""SANA / SANA-1.5 transformer (diffusers `SanaTransformer2DModel`) in Flax NNX.

A linear DiT: 1x1-conv patch embed, AdaLN-single timestep conditioning (one shared
`time_embed.linear` producing 6*dim, plus a `scale_shift_table` per block), caption projection
+ RMSNorm, blocks of ReLU linear self-attention / softmax cross-attention / Mix-FFN
(`pqjax.models.sana_blocks`), a final norm modulated by its own `scale_shift_table`.
Module names mirror diffusers', so checkpoints map onto it by rule.

    model = SanaTransformer2DModel(PRESETS["sana-1.5-1.6b"], dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    v = model(hidden_states=latents,              # (b, 32, H/32, W/32) NCHW DC-AE latents
              encoder_hidden_states=gemma,        # (b, 300, 2304) Gemma-2-2B-it hidden states
              encoder_attention_mask=mask,        # (b, 300) 1 = token, 0 = padding
              timestep=t)                         # (b,) int(sigma * 1000), see below
    # v: (b, 32, H/32, W/32), the flow velocity (noise - x0)

Sampling, as `diffusers.SanaPipeline` runs SANA-1.5-1.6B (pipelines/sana/pipeline_sana.py and
diffusers' scripts/convert_sana_to_diffusers.py, which writes the scheduler config):
- Scheduler: `DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0,
  prediction_type="flow_prediction")`, i.e. 2nd-order DPM-Solver++ on flow sigmas with
  `final_sigmas_type="zero"` (the "flow-dpm_solver" of the SANA paper). flow_shift is 6.0 only
  for the 4K models.
- Sigmas: `s = 1 - linspace(1, 1/1000, steps + 1)`, shifted `3 s / (1 + 2 s)`, reversed, last
  dropped; the transformer receives the scheduler's integer timestep `int(sigma * 1000)` (as
  diffusers' DPMSolverMultistepScheduler truncates it; `pqjax.pipelines.sana`) times
  `config.timestep_scale` (1.0 here), broadcast to the batch. No further scaling happens
  inside the model (unlike FLUX, which multiplies by 1000 itself).
- Defaults: `num_inference_steps=20`, `guidance_scale=4.5` (true classifier-free guidance: the
  batch is `[uncond; cond]`, the uncond caption being the encoded empty prompt "" with its own
  mask, `v = v_u + 4.5 (v_c - v_u)`), 1024x1024 px -> 32x32 latents, `max_sequence_length=300`
  (the prompt is prefixed with the "complex human instruction"; the first token and the last
  299 are kept), the caption mask passed as `encoder_attention_mask`.
- Latents are decoded by DC-AE (`latents / vae.config.scaling_factor`).
Guidance-embedding models (SANA-Sprint, `guidance_embeds=True`) are called with
`guidance = guidance_scale * config.guidance_embeds_scale` and an SCM timestep in [0, 1]; that
sampler (SCMScheduler) is different.

Config fields the forward pass does not read: `dropout` (inference), `timestep_scale` and
`guidance_embeds_scale` (applied by the pipeline), `sample_size` (only the base grid of the
positional embedding when `interpolation_scale` is set).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pqjax.models.conv import Conv2d
from pqjax.models.embeddings import TimestepEmbedding, timestep_embedding
from pqjax.models.layers import LayerNorm, Linear, RMSNorm, gelu_tanh, silu
from pqjax.models.sana_blocks import SanaTransformerBlock

QK_NORMS = (None, "rms_norm_across_heads")


@dataclasses.dataclass(frozen=True)
class SanaConfig:
    """diffusers' SanaTransformer2DModel config. Defaults are diffusers' own (so config.json files
    written before a field existed parse as diffusers reads them); see `PRESETS` for checkpoints.
    """

    in_channels: int = 32
    out_channels: int | None = 32
    num_attention_heads: int = 70
    attention_head_dim: int = 32
    num_layers: int = 20
    num_cross_attention_heads: int | None = 20
    cross_attention_head_dim: int | None = 112
    cross_attention_dim: int | None = 2240
    caption_channels: int = 2304
    mlp_ratio: float = 2.5
    dropout: float = 0.0
    attention_bias: bool = False
    sample_size: int = 32
    patch_size: int = 1
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-6
    interpolation_scale: float | None = None
    guidance_embeds: bool = False
    guidance_embeds_scale: float = 0.1
    qk_norm: str | None = None
    timestep_scale: float = 1.0

    def __post_init__(self):
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm={self.qk_norm!r} is not supported; supported: {QK_NORMS}")
        # diffusers' block reads norm2 even without cross-attention, so such a model cannot run.
        if self.cross_attention_dim is None:
            raise ValueError("cross_attention_dim=None is not supported (diffusers cannot run it)")
        if self.cross_attention_dim != self.inner_dim:
            raise ValueError(
                f"cross_attention_dim={self.cross_attention_dim} must equal num_attention_heads * "
                f"attention_head_dim = {self.inner_dim}: the projected caption has that width"
            )
        if not self.num_cross_attention_heads or not self.cross_attention_head_dim:
            raise ValueError(
                "num_cross_attention_heads and cross_attention_head_dim must be set, got "
                f"{self.num_cross_attention_heads}, {self.cross_attention_head_dim}"
            )
        if self.patch_size < 1:
            raise ValueError(f"patch_size={self.patch_size} must be >= 1")
        if int(self.mlp_ratio * self.inner_dim) < 1:
            raise ValueError(f"mlp_ratio={self.mlp_ratio} gives an empty Mix-FFN")
        if self.interpolation_scale is not None and self.inner_dim % 4:
            raise ValueError(
                f"interpolation_scale={self.interpolation_scale} needs a 2-D sin-cos positional "
                f"embedding, which needs inner_dim % 4 == 0 (got {self.inner_dim})"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


# SANA1.5_1.6B_1024px: the SANA-1.0 1.6B architecture (diffusers' convert_sana_to_diffusers.py,
# "SanaMS1.5_1600M_P1_D20": 70x32 heads, 20 layers, 20x112 cross heads, caption 2304 (Gemma-2-2B),
# mlp_ratio 2.5, no attention bias, 32-channel DC-AE latents, patch 1, sample_size 1024 // 32,
# interpolation_scale None at 1024 px) with qk_norm="rms_norm_across_heads", which that script
# sets for every SANA-1.5 / Sprint model; not guidance-distilled. 1,604,641,952 parameters.
PRESETS: dict[str, SanaConfig] = {
    "sana-1.5-1.6b": SanaConfig(qk_norm="rms_norm_across_heads"),
}


def sincos_pos_embed_2d(
    dim: int, height: int, width: int, *, base_size: int, interpolation_scale: float
) -> np.ndarray:
    """diffusers' `get_2d_sincos_pos_embed` for a `height x width` grid: `(height*width, dim)` f32.

    Token `(i, j)` (row-major) gets `[sincos(x_j); sincos(y_i)]`, each `dim/2` wide, with
    positions `arange(n) / (n / base_size) / interpolation_scale`.
    """
    ys = np.arange(height, dtype=np.float32) / np.float32(height / base_size)
    xs = np.arange(width, dtype=np.float32) / np.float32(width / base_size)
    ys, xs = ys / np.float32(interpolation_scale), xs / np.float32(interpolation_scale)
    quarter = dim // 4
    # diffusers computes the frequencies and angles in float64.
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)

    def sincos(pos: np.ndarray) -> np.ndarray:
        ang = pos.astype(np.float64)[:, None] * omega[None, :]
        return np.concatenate([np.sin(ang), np.cos(ang)], axis=-1)

    ex = np.broadcast_to(sincos(xs)[None, :, :], (height, width, 2 * quarter))
    ey = np.broadcast_to(sincos(ys)[:, None, :], (height, width, 2 * quarter))
    return np.concatenate([ex, ey], axis=-1).reshape(height * width, dim).astype(np.float32)


class PatchEmbed(nnx.Module):
    """`proj`: a `patch x patch` stride-`patch` conv (16-bit); optional sin-cos positions.

    x: `(b, H, W, in)` -> `(b, (H//p) * (W//p), dim)` row-major tokens.
    """

    def __init__(
        self, in_channels: int, dim: int, patch_size: int, *, base_size: int,
        interpolation_scale: float | None, dtype: Any, rngs: nnx.Rngs,
    ):
        self.dim, self.base_size, self.interpolation_scale = dim, base_size, interpolation_scale
        self.proj = Conv2d(in_channels, dim, patch_size, stride=patch_size, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.proj(x)
        b, h, w, d = y.shape
        y = y.reshape(b, h * w, d)
        if self.interpolation_scale is None:
            return y
        pos = sincos_pos_embed_2d(
            d, h, w, base_size=self.base_size, interpolation_scale=self.interpolation_scale
        )
        return (y.astype(jnp.float32) + jnp.asarray(pos)[None]).astype(y.dtype)


class TimestepProjEmbeddings(nnx.Module):
    """diffusers `PixArtAlphaCombinedTimestepSizeEmbeddings` without size conditions:
    `timestep_embedder(sinusoid_256(t))`. t: `(b,)` -> `(b, dim)`.
    """

    def __init__(self, dim: int, *, dtype: Any, rngs: nnx.Rngs):
        self.timestep_embedder = TimestepEmbedding(256, dim, dtype=dtype, rngs=rngs)

    def __call__(self, timestep: jax.Array, dtype: Any) -> jax.Array:
        return self.timestep_embedder(timestep_embedding(timestep, 256).astype(dtype))


class AdaLayerNormSingle(nnx.Module):
    """adaLN-single: returns `(linear(silu(e)) (b, 6*dim), e (b, dim))`, e the timestep embedding.

    The 6 output chunks are `SanaTransformerBlock.CHUNKS`, shared by every block.
    """

    def __init__(self, dim: int, *, dtype: Any, rngs: nnx.Rngs):
        self.emb = TimestepProjEmbeddings(dim, dtype=dtype, rngs=rngs)
        self.linear = Linear(dim, 6 * dim, dtype=dtype, rngs=rngs)

    def __call__(self, timestep: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
        e = self.emb(timestep, dtype)
        return self.linear(silu(e)), e


class SanaCombinedTimestepGuidanceEmbeddings(nnx.Module):
    """adaLN-single with a guidance embedding (SANA-Sprint): e = emb(t) + emb(guidance)."""

    def __init__(self, dim: int, *, dtype: Any, rngs: nnx.Rngs):
        self.timestep_embedder = TimestepEmbedding(256, dim, dtype=dtype, rngs=rngs)
        self.guidance_embedder = TimestepEmbedding(256, dim, dtype=dtype, rngs=rngs)
        self.linear = Linear(dim, 6 * dim, dtype=dtype, rngs=rngs)

    def __call__(
        self, timestep: jax.Array, guidance: jax.Array, dtype: Any
    ) -> tuple[jax.Array, jax.Array]:
        e = self.timestep_embedder(timestep_embedding(timestep, 256).astype(dtype))
        e = e + self.guidance_embedder(timestep_embedding(guidance, 256).astype(dtype))
        return self.linear(silu(e)), e


class CaptionProjection(nnx.Module):
    """diffusers `PixArtAlphaTextProjection`: `linear_2(gelu_tanh(linear_1(x)))`."""

    def __init__(self, in_features: int, dim: int, *, dtype: Any, rngs: nnx.Rngs):
        self.linear_1 = Linear(in_features, dim, dtype=dtype, rngs=rngs)
        self.linear_2 = Linear(dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(gelu_tanh(self.linear_1(x)))


class SanaModulatedNorm(nnx.Module):
    """Final LayerNorm; `(shift, scale) = table (2, dim) + temb`, note shift comes first."""

    def __init__(self, dim: int, *, eps: float, dtype: Any):
        self.norm = LayerNorm(dim, eps=eps, elementwise_affine=False, dtype=dtype)

    def __call__(self, x: jax.Array, temb: jax.Array, table: jax.Array) -> jax.Array:
        mod = table[None] + temb[:, None]
        return self.norm(x, mod[:, 1], mod[:, 0])


class SanaTransformer2DModel(nnx.Module):
    """The SANA transformer. Parameters in `dtype`; see the module docstring for the call."""

    def __init__(self, config: SanaConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        c = config
        dim = c.inner_dim
        self.out_channels = c.out_channels or c.in_channels
        self.patch_embed = PatchEmbed(
            c.in_channels, dim, c.patch_size, base_size=c.sample_size // c.patch_size,
            interpolation_scale=c.interpolation_scale, dtype=dtype, rngs=rngs,
        )
        self.time_embed = (
            SanaCombinedTimestepGuidanceEmbeddings(dim, dtype=dtype, rngs=rngs)
            if c.guidance_embeds
            else AdaLayerNormSingle(dim, dtype=dtype, rngs=rngs)
        )
        self.caption_projection = CaptionProjection(c.caption_channels, dim, dtype=dtype, rngs=rngs)
        self.caption_norm = RMSNorm(dim, eps=1e-5, dtype=dtype)
        self.transformer_blocks = nnx.List(
            [
                SanaTransformerBlock(
                    dim, c.num_attention_heads, c.attention_head_dim,
                    cross_heads=c.num_cross_attention_heads,
                    cross_head_dim=c.cross_attention_head_dim,
                    cross_attention_dim=c.cross_attention_dim,
                    attention_bias=c.attention_bias,
                    norm_elementwise_affine=c.norm_elementwise_affine,
                    norm_eps=c.norm_eps,
                    mlp_ratio=c.mlp_ratio,
                    qk_norm=c.qk_norm is not None,
                    dtype=dtype, rngs=rngs,
                )
                for _ in range(c.num_layers)
            ]
        )
        self.scale_shift_table = nnx.Param(
            (jax.random.normal(rngs.params(), (2, dim), jnp.float32) / dim**0.5).astype(dtype)
        )
        self.norm_out = SanaModulatedNorm(dim, eps=1e-6, dtype=dtype)
        out_dim = c.patch_size * c.patch_size * self.out_channels
        self.proj_out = Linear(dim, out_dim, dtype=dtype, rngs=rngs)

    def embed(
        self,
        hidden_states: jax.Array,
        encoder_hidden_states: jax.Array,
        timestep: jax.Array,
        guidance: jax.Array | None,
        encoder_attention_mask: jax.Array | None,
    ) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array, jax.Array]:
        """Input embeddings: (x, context, context_bias, temb (b, 6*dim), embedded_timestep)."""
        b = hidden_states.shape[0]
        x = self.patch_embed(jnp.transpose(hidden_states, (0, 2, 3, 1)))
        # diffusers needs `(b,)`; a scalar or `(1,)` timestep is broadcast for convenience.
        t = jnp.broadcast_to(jnp.asarray(timestep).reshape(-1), (b,))
        if self.config.guidance_embeds:
            if guidance is None:
                raise ValueError("this model has guidance embeddings (guidance_embeds=True): "
                                 "pass `guidance` (b,)")
            g = jnp.broadcast_to(jnp.asarray(guidance).reshape(-1), (b,))
            temb, embedded = self.time_embed(t, g, x.dtype)
        else:
            if guidance is not None:
                raise ValueError("`guidance` given but the config has guidance_embeds=False")
            temb, embedded = self.time_embed(t, x.dtype)
        context = self.caption_projection(encoder_hidden_states).reshape(b, -1, x.shape[-1])
        context = self.caption_norm(context)
        return x, context, _key_bias(encoder_attention_mask, hidden_states.dtype), temb, embedded

    def __call__(
        self,
        hidden_states: jax.Array,
        encoder_hidden_states: jax.Array,
        timestep: jax.Array,
        guidance: jax.Array | None = None,
        encoder_attention_mask: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        controlnet_block_samples: Sequence[jax.Array] | None = None,
    ) -> jax.Array:
        """diffusers' forward, same meaning and scaling.

        hidden_states: `(b, in_channels, H, W)` NCHW latents; encoder_hidden_states:
        `(b, s, caption_channels)`; timestep: `(b,)` as the pipeline passes it (no scaling
        inside); guidance: `(b,)` iff `guidance_embeds`; encoder_attention_mask: `(b, s)` with
        1 = keep, 0 = padding (or an already-additive bias `(b, 1, s)`); attention_mask is
        accepted and unused, as in diffusers (linear self-attention takes no mask);
        controlnet_block_samples: residuals `(b, n, dim)` added after blocks 1..len.
        Returns `(b, out_channels, H//p*p, W//p*p)` NCHW.
        """
        del attention_mask
        _, _, height, width = hidden_states.shape
        p = self.config.patch_size
        hp, wp = height // p, width // p
        x, context, bias, temb, embedded = self.embed(
            hidden_states, encoder_hidden_states, timestep, guidance, encoder_attention_mask
        )
        for i, block in enumerate(self.transformer_blocks):
            x = block(x, context, bias, temb, hp, wp)
            if controlnet_block_samples is not None and 0 < i <= len(controlnet_block_samples):
                x = x + controlnet_block_samples[i - 1]
        return self.head(x, embedded, hp, wp)

    def head(self, x: jax.Array, embedded: jax.Array, hp: int, wp: int) -> jax.Array:
        """The last block's tokens `(b, hp * wp, dim)` -> the output `(b, c, hp p, wp p)`."""
        b, p = x.shape[0], self.config.patch_size
        x = self.proj_out(self.norm_out(x, embedded, self.scale_shift_table[...]))
        x = x.reshape(b, hp, wp, p, p, -1)
        # (b, hp, wp, p, p, c) -> (b, c, hp, p, wp, p): diffusers' unpatchify.
        return jnp.transpose(x, (0, 5, 1, 3, 2, 4)).reshape(b, -1, hp * p, wp * p)


def _key_bias(mask: jax.Array | None, dtype: Any) -> jax.Array | None:
    """Caption mask -> additive bias `(b, 1, s)`: `(1 - mask) * -10000` as diffusers does
    (finite, so a fully padded caption attends to all tokens as in diffusers)."""
    if mask is None:
        return None
    if mask.ndim == 2:
        return ((1 - mask.astype(dtype)) * -10000.0)[:, None, :]
    if mask.ndim == 3:
        return mask
    raise ValueError(f"encoder_attention_mask must be (b, s) or (b, 1, s), got {mask.shape}")
