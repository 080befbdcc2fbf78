"""Gemma-2 text model (transformers `Gemma2Model`) in Flax NNX: SANA's prompt encoder.

SANA-1.5 reads the last hidden state of Gemma-2-2B-it (`text_encoder/`). The model is a
pre- and post-norm decoder: each sub-layer is `x + post_norm(f(pre_norm(x)))`, with Gemma's
RMSNorm `(1 + weight)`; the token embedding is scaled by sqrt(hidden_size) (rounded to the
weights' dtype, as transformers does); attention is grouped-query with logits scaled by
`query_pre_attn_scalar ** -0.5` and soft-capped, `cap * tanh(s / cap)`; layers alternate
sliding-window (even index) and global (odd index) causal attention unless `layer_types`
says otherwise; the MLP is `down(gelu_tanh(gate x) * up x)`. The module tree mirrors
transformers': `embed_tokens`, `layers[i].self_attn.{q,k,v,o}_proj`, `layers[i].mlp.*`,
`layers[i].{input,post_attention,pre_feedforward,post_feedforward}_layernorm`, `norm`.

    model = Gemma2Model(Gemma2Config(hidden_size=64, ...), rngs=nnx.Rngs(0))
    hidden = model(input_ids, attention_mask)   # (batch, seq) -> (batch, seq, hidden_size)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pqjax.models.causal_lm import (
    GatedMLP,
    LMRMSNorm,
    apply_rope,
    causal_mask,
    check_lm_shape,
    gqa_attention,
    read_lm_config,
    rope_tables,
    write_lm_config,
)
from pqjax.models.configs import ConfigError
from pqjax.models.conv import Embedding
from pqjax.models.layers import Linear
from pqjax.models.presets_text import GENERIC_FIELDS, check_activation

LAYER_TYPES = ("sliding_attention", "full_attention")
# Fields that do not change the encoder's forward pass: the LM head's final soft-cap, special
# ids, the generation cache, and RoPE (read separately by `rope_theta`).
CONFIG_IGNORED: tuple[str, ...] = (
    *GENERIC_FIELDS, "final_logit_softcapping", "pad_token_id", "eos_token_id", "bos_token_id",
    "tie_word_embeddings", "cache_implementation", "rope_parameters", "rope_theta",
    "rope_scaling", "max_position_embeddings", "hidden_act",
)


@dataclasses.dataclass(frozen=True)
class Gemma2Config:
    """transformers' `Gemma2Config` fields that shape `Gemma2Model`; defaults are Gemma-2-2B's."""

    vocab_size: int = 256000
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    query_pre_attn_scalar: float = 256
    sliding_window: int | None = 4096
    layer_types: tuple[str, ...] | None = None
    attn_logit_softcapping: float | None = 50.0
    use_bidirectional_attention: bool | None = None
    rope_theta: float = 10000.0

    def __post_init__(self):
        src = "Gemma2Config"
        check_lm_shape(self, src)
        if self.layer_types is None:
            kinds = tuple(LAYER_TYPES[i % 2] for i in range(self.num_hidden_layers))
            object.__setattr__(self, "layer_types", kinds)
        if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= set(
            LAYER_TYPES
        ):
            raise ConfigError(f"{src}: layer_types must list {self.num_hidden_layers} of "
                              f"{LAYER_TYPES}, got {self.layer_types!r}")
        if self.use_bidirectional_attention:
            raise ConfigError(f"{src}: use_bidirectional_attention is not supported")
        if "sliding_attention" in self.layer_types and not (
            isinstance(self.sliding_window, int) and self.sliding_window > 0
        ):
            raise ConfigError(f"{src}: sliding_window must be a positive integer, "
                              f"got {self.sliding_window!r}")


def read_config(raw: dict[str, Any], source: str) -> Gemma2Config:
    """Parse a transformers Gemma-2 config.json (4.x `rope_theta` or 5.x `rope_parameters`)."""
    if isinstance(raw, dict):  # 4.x configs name the activation hidden_act too
        act = raw.get("hidden_activation", raw.get("hidden_act", "gelu_pytorch_tanh"))
        check_activation(act, "hidden_activation", source)
        raw = {**raw, "hidden_activation": act}
    return read_lm_config(Gemma2Config, raw, source, "gemma2", CONFIG_IGNORED, 10000.0)


def write_config(config: Gemma2Config) -> dict[str, Any]:
    """The config.json transformers' `Gemma2Model.from_pretrained` reads back to `config`."""
    return write_lm_config(config, "Gemma2Model", "gemma2")


# Gemma-2-2B-it as SANA-1.5-1.6B ships it in `text_encoder/` (2.61 B parameters).
GEMMA2_2B = Gemma2Config()


class Gemma2Attention(nnx.Module):
    def __init__(self, config: Gemma2Config, layer: int, *, dtype: Any, rngs: nnx.Rngs):
        d, hd = config.hidden_size, config.head_dim
        self.heads, self.kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, hd)
        self.scale = float(config.query_pre_attn_scalar) ** -0.5
        self.softcap = config.attn_logit_softcapping
        bias = config.attention_bias
        self.q_proj = Linear(d, self.heads * hd, use_bias=bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(d, self.kv_heads * hd, use_bias=bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(d, self.kv_heads * hd, use_bias=bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(self.heads * hd, d, use_bias=bias, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], mask: jax.Array
                 ) -> jax.Array:
        b, s, _ = x.shape
        q = apply_rope(self.q_proj(x).reshape(b, s, self.heads, self.head_dim), *rope)
        k = apply_rope(self.k_proj(x).reshape(b, s, self.kv_heads, self.head_dim), *rope)
        v = self.v_proj(x).reshape(b, s, self.kv_heads, self.head_dim)
        out = gqa_attention(q, k, v, mask, scale=self.scale, softcap=self.softcap)
        return self.o_proj(out.reshape(b, s, -1))


class Gemma2DecoderLayer(nnx.Module):
    def __init__(self, config: Gemma2Config, layer: int, *, dtype: Any, rngs: nnx.Rngs):
        def norm():
            return LMRMSNorm(config.hidden_size, eps=config.rms_norm_eps, offset=1.0, dtype=dtype)

        self.sliding = config.layer_types[layer] == "sliding_attention"
        self.self_attn = Gemma2Attention(config, layer, dtype=dtype, rngs=rngs)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size,
                            config.hidden_activation, dtype=dtype, rngs=rngs)
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.post_feedforward_layernorm = norm()

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array],
                 masks: dict[bool, jax.Array]) -> jax.Array:
        h = self.self_attn(self.input_layernorm(x), rope, masks[self.sliding])
        x = x + self.post_attention_layernorm(h)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma2Model(nnx.Module):
    """transformers' `Gemma2Model` (no LM head). Parameters in `dtype`; norms, softmax in f32."""

    def __init__(self, config: Gemma2Config, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype=dtype,
                                      rngs=rngs)
        self.layers = nnx.List([Gemma2DecoderLayer(config, i, dtype=dtype, rngs=rngs)
                                for i in range(config.num_hidden_layers)])
        self.norm = LMRMSNorm(config.hidden_size, eps=config.rms_norm_eps, offset=1.0,
                              dtype=dtype)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None
                 ) -> jax.Array:
        """input_ids `(batch, seq)` int; attention_mask `(batch, seq)`, nonzero = real token
        (right padding, as SanaPipeline tokenizes). Returns the last hidden state
        `(batch, seq, hidden_size)`, after the final norm."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {input_ids.shape}")
        b, s = input_ids.shape
        emb = self.embed_tokens(input_ids)
        x = emb * jnp.asarray(math.sqrt(self.config.hidden_size), emb.dtype)
        positions = jnp.broadcast_to(jnp.arange(s), (b, s))
        rope = rope_tables(positions, self.config.head_dim, self.config.rope_theta)
        masks = {False: causal_mask(attention_mask, b, s),
                 True: causal_mask(attention_mask, b, s, window=self.config.sliding_window)}
        for layer in self.layers:
            x = layer(x, rope, masks)
        return self.norm(x)
