"""T5 encoder (transformers `T5EncoderModel`) in Flax NNX: FLUX's sequence-prompt encoder.

Pre-RMSNorm transformer without absolute positions: block 0's attention owns a learned
bias per (relative-position bucket, head), added to every layer's logits; no 1/sqrt(d) logit
scaling. Feed-forward: gated (`wo(act(wi_0 x) * wi_1 x)`, T5 v1.1, FLUX's gelu_new) or plain
(`wo(act(wi x))`, original T5, relu). The module tree mirrors transformers':
`shared`, `encoder.block[i].layer[0].SelfAttention.{q,k,v,o}`, `layer[0].layer_norm`,
`layer[1].DenseReluDense.{wi_0,wi_1,wo | wi,wo}`, `layer[1].layer_norm`,
`encoder.final_layer_norm`.

Checkpoints: transformers ties `encoder.embed_tokens` to `shared` and `save_pretrained`
writes only `shared.weight` (4.x and 5.x alike; FLUX.1's `text_encoder_2/` too), so the encoder
reads token embeddings from `shared` and has no `embed_tokens` of its own. Checkpoints that
also carry `encoder.embed_tokens.weight` are handled by `convert.keymaps.t5`.

    model = T5EncoderModel(T5Config(d_model=64, ...), rngs=nnx.Rngs(0))
    hidden = model(input_ids, attention_mask=None)   # (batch, seq) -> (batch, seq, d_model)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pqjax.models.configs import ConfigError
from pqjax.models.conv import Embedding
from pqjax.models.layers import Linear, RMSNorm
from pqjax.models.presets_text import (
    ACTIVATIONS,
    FLUX_T5_XXL_CONFIG,
    GENERIC_FIELDS,
    activation,
    check_activation,
    parse_config,
)

# Irrelevant to the encoder beyond GENERIC_FIELDS: decoder depth, the encoder-decoder flag,
# decoder output scaling (tie_word_embeddings / scale_decoder_outputs), special ids, and the
# old `n_positions` (T5 has no absolute positions).
CONFIG_IGNORED: tuple[str, ...] = (
    *GENERIC_FIELDS, "num_decoder_layers", "is_encoder_decoder", "tie_word_embeddings",
    "scale_decoder_outputs", "pad_token_id", "eos_token_id", "bos_token_id", "n_positions",
)


@dataclasses.dataclass(frozen=True)
class T5Config:
    """transformers' `T5Config` fields that shape `T5EncoderModel`; defaults are transformers'.

    As in transformers, `dense_act_fn` and `is_gated_act` derive from `feed_forward_proj`
    ("gated-gelu" -> gelu_new, gated) unless given explicitly.
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    dense_act_fn: str | None = None
    is_gated_act: bool | None = None
    is_decoder: bool = False

    def __post_init__(self):
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(
                f"feed_forward_proj {self.feed_forward_proj!r} must be 'ACT' or 'gated-ACT'"
            )
        if self.dense_act_fn is None:
            act = "gelu_new" if self.feed_forward_proj == "gated-gelu" else parts[-1]
            object.__setattr__(self, "dense_act_fn", act)
        if self.is_gated_act is None:
            object.__setattr__(self, "is_gated_act", parts[0] == "gated")
        if self.dense_act_fn not in ACTIVATIONS:
            raise ValueError(f"dense_act_fn {self.dense_act_fn!r} not in {sorted(ACTIVATIONS)}")
        if self.is_decoder:
            raise ValueError("is_decoder is true: T5EncoderModel would run causally; unsupported")
        if self.relative_attention_num_buckets < 4:
            raise ValueError("relative_attention_num_buckets must be >= 4")

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv


def read_config(raw: dict[str, Any], source: str) -> T5Config:
    """Parse a transformers `T5EncoderModel` config.json; unknown fields are errors."""
    model_type = raw.get("model_type", "t5")
    if model_type != "t5":
        raise ConfigError(f"{source}: model_type {model_type!r} is not 't5'")
    if "dense_act_fn" in raw:
        check_activation(raw["dense_act_fn"], "dense_act_fn", source)
    return parse_config(T5Config, raw, source, CONFIG_IGNORED)


def write_config(config: T5Config) -> dict[str, Any]:
    """The config.json transformers' `T5EncoderModel.from_pretrained` reads back to `config`."""
    return {"architectures": ["T5EncoderModel"], "model_type": "t5",
            "is_encoder_decoder": False, "use_cache": False, **dataclasses.asdict(config)}


# FLUX.1's T5 v1.1 XXL encoder (see presets_text.FLUX_T5_XXL_CONFIG).
T5_XXL_FLUX = read_config(FLUX_T5_XXL_CONFIG, "presets_text.FLUX_T5_XXL_CONFIG")


def relative_position_bucket(
    relative_position: np.ndarray, num_buckets: int, max_distance: int
) -> np.ndarray:
    """T5's bidirectional bucketing of `key_pos - query_pos` (int array) into [0, num_buckets).

    Half the buckets per direction; within each, distances below a quarter of num_buckets get
    their own bucket and larger ones share log-spaced buckets up to `max_distance`. Computed on
    the host in float32 like transformers, so bucket edges (where the log lands on an integer,
    e.g. distance 16, 32, 64 for FLUX's T5) do not depend on the accelerator's log.
    """
    half = num_buckets // 2
    direction = np.where(relative_position > 0, half, 0)
    distance = np.abs(relative_position)
    max_exact = half // 2
    # Clamped before the log so distance 0 stays finite; those positions use the exact branch.
    scaled = np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact))
    scaled = scaled / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
    large = np.minimum(max_exact + scaled.astype(np.int64), half - 1)
    return direction + np.where(distance < max_exact, distance, large)


def unscaled_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, mask: jax.Array | None
) -> jax.Array:
    """softmax(q k^T + bias) v, logits and softmax in float32.

    q, k, v: `(batch, seq, heads, head_dim)`; bias `(1, heads, seq, seq)`; mask bool
    broadcastable to `(batch, heads, seq, seq)`, True = attend. T5 does not scale its logits,
    so they reach the hundreds: rounding them to bf16 (as jax.nn.dot_product_attention does for
    bf16 inputs) would cost most of the softmax's precision.
    """
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


class T5Attention(nnx.Module):
    """Unscaled multi-head attention; block 0's carries `relative_attention_bias`."""

    def __init__(self, config: T5Config, *, has_relative_attention_bias: bool, dtype: Any,
                 rngs: nnx.Rngs):
        d, inner = config.d_model, config.inner_dim
        self.heads, self.head_dim = config.num_heads, config.d_kv
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.q = Linear(d, inner, use_bias=False, dtype=dtype, rngs=rngs)
        self.k = Linear(d, inner, use_bias=False, dtype=dtype, rngs=rngs)
        self.v = Linear(d, inner, use_bias=False, dtype=dtype, rngs=rngs)
        self.o = Linear(inner, d, use_bias=False, dtype=dtype, rngs=rngs)
        self.relative_attention_bias = nnx.data(
            Embedding(self.num_buckets, self.heads, dtype=dtype, rngs=rngs)
            if has_relative_attention_bias else None
        )

    def position_bias(self, seq: int) -> jax.Array:
        """Learned bias `(1, heads, seq, seq)` for query i attending to key j."""
        pos = np.arange(seq)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.num_buckets,
                                           self.max_distance)
        bias = self.relative_attention_bias(jnp.asarray(buckets, jnp.int32))
        return jnp.transpose(bias, (2, 0, 1))[None]

    def __call__(self, x: jax.Array, bias: jax.Array, mask: jax.Array | None) -> jax.Array:
        """x: `(batch, seq, d_model)`; bias `(1, heads, seq, seq)`; mask bool `(b, 1, 1, seq)`."""
        shape = (*x.shape[:-1], self.heads, self.head_dim)
        q = self.q(x).reshape(shape)
        k = self.k(x).reshape(shape)
        v = self.v(x).reshape(shape)
        out = unscaled_attention(q, k, v, bias, mask)
        return self.o(out.reshape(*x.shape[:-1], -1))


class T5LayerSelfAttention(nnx.Module):
    def __init__(self, config: T5Config, *, has_relative_attention_bias: bool, dtype: Any,
                 rngs: nnx.Rngs):
        self.SelfAttention = T5Attention(
            config, has_relative_attention_bias=has_relative_attention_bias, dtype=dtype,
            rngs=rngs,
        )
        self.layer_norm = RMSNorm(config.d_model, eps=config.layer_norm_epsilon, dtype=dtype)

    def __call__(self, x: jax.Array, bias: jax.Array, mask: jax.Array | None) -> jax.Array:
        return x + self.SelfAttention(self.layer_norm(x), bias, mask)


class T5DenseGatedActDense(nnx.Module):
    """T5 v1.1 feed-forward: `wo(act(wi_0 x) * wi_1 x)`."""

    def __init__(self, config: T5Config, *, dtype: Any, rngs: nnx.Rngs):
        d, ff = config.d_model, config.d_ff
        self.act = config.dense_act_fn
        self.wi_0 = Linear(d, ff, use_bias=False, dtype=dtype, rngs=rngs)
        self.wi_1 = Linear(d, ff, use_bias=False, dtype=dtype, rngs=rngs)
        self.wo = Linear(ff, d, use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.wo(activation(self.act)(self.wi_0(x)) * self.wi_1(x))


class T5DenseActDense(nnx.Module):
    """Original T5 feed-forward: `wo(act(wi x))`."""

    def __init__(self, config: T5Config, *, dtype: Any, rngs: nnx.Rngs):
        self.act = config.dense_act_fn
        self.wi = Linear(config.d_model, config.d_ff, use_bias=False, dtype=dtype, rngs=rngs)
        self.wo = Linear(config.d_ff, config.d_model, use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.wo(activation(self.act)(self.wi(x)))


class T5LayerFF(nnx.Module):
    def __init__(self, config: T5Config, *, dtype: Any, rngs: nnx.Rngs):
        dense = T5DenseGatedActDense if config.is_gated_act else T5DenseActDense
        self.DenseReluDense = dense(config, dtype=dtype, rngs=rngs)
        self.layer_norm = RMSNorm(config.d_model, eps=config.layer_norm_epsilon, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.DenseReluDense(self.layer_norm(x))


def _clamp_fp16(x: jax.Array) -> jax.Array:
    # transformers keeps float16 T5 finite this way (v1.1 activations overflow fp16).
    if x.dtype != jnp.float16:
        return x
    big = jnp.finfo(jnp.float16).max
    limit = jnp.where(jnp.isinf(x).any(), big - 1000, big)
    return jnp.clip(x, -limit, limit)


class T5Block(nnx.Module):
    def __init__(self, config: T5Config, *, has_relative_attention_bias: bool, dtype: Any,
                 rngs: nnx.Rngs):
        self.layer = nnx.List([
            T5LayerSelfAttention(config, has_relative_attention_bias=has_relative_attention_bias,
                                 dtype=dtype, rngs=rngs),
            T5LayerFF(config, dtype=dtype, rngs=rngs),
        ])

    def __call__(self, x: jax.Array, bias: jax.Array, mask: jax.Array | None) -> jax.Array:
        x = _clamp_fp16(self.layer[0](x, bias, mask))
        return _clamp_fp16(self.layer[1](x))


class T5Stack(nnx.Module):
    """The encoder stack: blocks, then the final RMS norm. Input is already embedded."""

    def __init__(self, config: T5Config, *, dtype: Any, rngs: nnx.Rngs):
        self.block = nnx.List([
            T5Block(config, has_relative_attention_bias=i == 0, dtype=dtype, rngs=rngs)
            for i in range(config.num_layers)
        ])
        self.final_layer_norm = RMSNorm(config.d_model, eps=config.layer_norm_epsilon,
                                        dtype=dtype)

    def __call__(self, x: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
        """x: `(batch, seq, d_model)`; attention_mask `(batch, seq)`, nonzero = real token."""
        bias = self.block[0].layer[0].SelfAttention.position_bias(x.shape[1])
        mask = None if attention_mask is None else (attention_mask != 0)[:, None, None, :]
        for block in self.block:
            x = block(x, bias, mask)
        return self.final_layer_norm(x)


class T5EncoderModel(nnx.Module):
    """transformers' `T5EncoderModel`. Parameters in `dtype`; RMS stats and softmax in f32.

    Every parameter is in `dtype`: transformers instead keeps `wo` in float32 when asked for
    float16 (T5 v1.1 overflows fp16); prefer bfloat16 or float32 here.
    """

    def __init__(self, config: T5Config, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.shared = Embedding(config.vocab_size, config.d_model, dtype=dtype, rngs=rngs)
        self.encoder = T5Stack(config, dtype=dtype, rngs=rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None
                 ) -> jax.Array:
        """input_ids: `(batch, seq)` int; attention_mask: `(batch, seq)`, nonzero = real token,
        or None (FluxPipeline passes none: pad tokens are attended to). Returns the
        last hidden state `(batch, seq, d_model)`.
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {input_ids.shape}")
        return self.encoder(self.shared(input_ids), attention_mask)
