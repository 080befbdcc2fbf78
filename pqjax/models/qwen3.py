"""Qwen3 text model (transformers `Qwen3Model`) in Flax NNX: Z-Image's prompt encoder.

Z-Image-Turbo reads Qwen3-4B's second-to-last hidden state (`hidden_states[-2]`, the output
of the next-to-last decoder layer, before the final norm): `hidden_state(ids, mask, layer=L-1)`
runs only the layers it needs. Each layer is pre-norm (`x + attn(norm(x))`,
`x + mlp(norm(x))`); attention is grouped-query with a per-head RMSNorm on q and k before RoPE
and logits scaled by head_dim ** -0.5; the MLP is `down(silu(gate x) * up x)`. The module tree
mirrors transformers': `embed_tokens`, `layers[i].self_attn.{q,k,v,o}_proj`,
`layers[i].self_attn.{q,k}_norm`, `layers[i].mlp.*`, `layers[i].{input,post_attention}_layernorm`,
`norm`.

    model = Qwen3Model(Qwen3Config(hidden_size=64, ...), rngs=nnx.Rngs(0))
    last = model(input_ids, attention_mask)                        # (batch, seq, hidden)
    feats = model.hidden_state(input_ids, attention_mask, layer=model.config.num_hidden_layers - 1)
"""

from __future__ import annotations

import dataclasses
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

CONFIG_IGNORED: tuple[str, ...] = (
    *GENERIC_FIELDS, "pad_token_id", "eos_token_id", "bos_token_id", "tie_word_embeddings",
    "rope_parameters", "rope_theta", "rope_scaling", "max_position_embeddings",
    "max_window_layers", "sliding_window", "layer_types",
)


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """transformers' `Qwen3Config` fields that shape `Qwen3Model`; defaults are Qwen3-4B's."""

    vocab_size: int = 151936
    hidden_size: int = 2560
    intermediate_size: int = 9728
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    use_sliding_window: bool = False
    rope_theta: float = 1000000.0

    def __post_init__(self):
        src = "Qwen3Config"
        check_lm_shape(self, src)
        if self.use_sliding_window:
            raise ConfigError(f"{src}: use_sliding_window is not supported (Qwen3 ships without)")


def read_config(raw: dict[str, Any], source: str) -> Qwen3Config:
    """Parse a transformers Qwen3 config.json (4.x `rope_theta` or 5.x `rope_parameters`)."""
    if isinstance(raw, dict):
        check_activation(raw.get("hidden_act", "silu"), "hidden_act", source)
    return read_lm_config(Qwen3Config, raw, source, "qwen3", CONFIG_IGNORED, 1000000.0)


def write_config(config: Qwen3Config) -> dict[str, Any]:
    """The config.json transformers' `Qwen3Model.from_pretrained` reads back to `config`."""
    return write_lm_config(config, "Qwen3Model", "qwen3")


# Qwen3-4B as Z-Image-Turbo ships it in `text_encoder/` (4.02 B parameters without the head).
QWEN3_4B = Qwen3Config()


class Qwen3Attention(nnx.Module):
    def __init__(self, config: Qwen3Config, *, dtype: Any, rngs: nnx.Rngs):
        d, hd = config.hidden_size, config.head_dim
        self.heads, self.kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, hd)
        bias = config.attention_bias
        self.q_proj = Linear(d, self.heads * hd, use_bias=bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(d, self.kv_heads * hd, use_bias=bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(d, self.kv_heads * hd, use_bias=bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(self.heads * hd, d, use_bias=bias, dtype=dtype, rngs=rngs)
        self.q_norm = LMRMSNorm(hd, eps=config.rms_norm_eps, offset=0.0, dtype=dtype)
        self.k_norm = LMRMSNorm(hd, eps=config.rms_norm_eps, offset=0.0, dtype=dtype)

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], mask: jax.Array
                 ) -> jax.Array:
        b, s, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(b, s, self.heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).reshape(b, s, self.kv_heads, self.head_dim))
        v = self.v_proj(x).reshape(b, s, self.kv_heads, self.head_dim)
        out = gqa_attention(apply_rope(q, *rope), apply_rope(k, *rope), v, mask,
                            scale=self.head_dim ** -0.5)
        return self.o_proj(out.reshape(b, s, -1))


class Qwen3DecoderLayer(nnx.Module):
    def __init__(self, config: Qwen3Config, *, dtype: Any, rngs: nnx.Rngs):
        self.self_attn = Qwen3Attention(config, dtype=dtype, rngs=rngs)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                            dtype=dtype, rngs=rngs)
        self.input_layernorm = LMRMSNorm(config.hidden_size, eps=config.rms_norm_eps,
                                         offset=0.0, dtype=dtype)
        self.post_attention_layernorm = LMRMSNorm(config.hidden_size, eps=config.rms_norm_eps,
                                                  offset=0.0, dtype=dtype)

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], mask: jax.Array
                 ) -> jax.Array:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Model(nnx.Module):
    """transformers' `Qwen3Model` (no LM head). Parameters in `dtype`; norms, softmax in f32."""

    def __init__(self, config: Qwen3Config, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype=dtype,
                                      rngs=rngs)
        self.layers = nnx.List([Qwen3DecoderLayer(config, dtype=dtype, rngs=rngs)
                                for _ in range(config.num_hidden_layers)])
        self.norm = LMRMSNorm(config.hidden_size, eps=config.rms_norm_eps, offset=0.0,
                              dtype=dtype)

    def hidden_state(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                     layer: int) -> jax.Array:
        """transformers' `hidden_states[layer]` `(batch, seq, hidden)`: the embeddings for 0,
        the output of decoder layer `layer - 1` for 0 < layer < L, the normed last hidden state
        for L (= `__call__`). Only the first `min(layer, L)` layers run."""
        n = self.config.num_hidden_layers
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= n:
            raise ValueError(f"layer must be an int in [0, {n}], got {layer!r}")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {input_ids.shape}")
        b, s = input_ids.shape
        x = self.embed_tokens(input_ids)
        rope = rope_tables(jnp.broadcast_to(jnp.arange(s), (b, s)), self.config.head_dim,
                           self.config.rope_theta)
        mask = causal_mask(attention_mask, b, s)
        for block in self.layers[:layer]:
            x = block(x, rope, mask)
        return self.norm(x) if layer == n else x

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None
                 ) -> jax.Array:
        """input_ids `(batch, seq)`; attention_mask `(batch, seq)`, nonzero = real token.
        Returns the last hidden state `(batch, seq, hidden)`, after the final norm."""
        return self.hidden_state(input_ids, attention_mask, layer=self.config.num_hidden_layers)
