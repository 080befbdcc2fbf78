"""CLIP text encoder (transformers `CLIPTextModel`) in Flax NNX: FLUX's pooled-prompt encoder.

Pre-LN transformer with learned absolute positions and a causal mask; the pooled output is the
final-normed hidden state at the EOS position. The module tree mirrors the published checkpoint
layout `text_model.{embeddings, encoder.layers[i], final_layer_norm}` (transformers 4.x; FLUX.1's
`text_encoder/`). transformers >= 5 saves the same tree without the `text_model.` prefix and
loads either; `convert.keymaps.clip.map_checkpoint_keys` maps the unprefixed keys (applied
once `convert.registry.ModelSpec` has its `map_keys` hook).

    model = CLIPTextModel(CLIPTextConfig(hidden_size=64, ...), rngs=nnx.Rngs(0))
    out = model(input_ids)               # input_ids: (batch, seq) int
    out.last_hidden_state, out.pooler_output   # (batch, seq, hidden), (batch, hidden)
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from pqjax.models.configs import ConfigError
from pqjax.models.conv import Embedding
from pqjax.models.layers import LayerNorm, Linear, attention
from pqjax.models.presets_text import (
    ACTIVATIONS,
    FLUX_CLIP_L_CONFIG,
    GENERIC_FIELDS,
    activation,
    check_activation,
    parse_config,
)

# Irrelevant to CLIPTextModel's forward pass beyond GENERIC_FIELDS: CLIP text is always causal
# and has no tied output head.
CONFIG_IGNORED: tuple[str, ...] = (*GENERIC_FIELDS, "is_decoder", "is_encoder_decoder",
                                   "tie_word_embeddings")

# Before transformers PR #24773 CLIP configs carried eos_token_id 2, and pooling took the position
# of the largest token id instead of the first EOS; transformers keeps that rule for eos == 2.
LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """transformers' `CLIPTextConfig` fields that shape `CLIPTextModel`; defaults are transformers'.

    `bos_token_id`, `pad_token_id` and `projection_dim` do not change this model; they are kept
    so an exported config.json matches the one read.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    bos_token_id: int | None = 49406
    pad_token_id: int | None = 1
    projection_dim: int | None = 512

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} not in {sorted(ACTIVATIONS)}")
        if not isinstance(self.eos_token_id, int) or isinstance(self.eos_token_id, bool):
            raise ValueError(
                f"eos_token_id must be a single int (pooling reads the EOS position), got "
                f"{self.eos_token_id!r}"
            )
        if not isinstance(self.layer_norm_eps, int | float):
            raise ValueError(f"layer_norm_eps must be a number, got {self.layer_norm_eps!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def read_config(raw: dict[str, Any], source: str) -> CLIPTextConfig:
    """Parse a transformers `CLIPTextModel` config.json; unknown fields are errors."""
    model_type = raw.get("model_type", "clip_text_model")
    if model_type != "clip_text_model":
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not a CLIP text tower ('clip_text_model'); "
            "for a full CLIPModel, save its text_model as a CLIPTextModel first"
        )
    check_activation(raw.get("hidden_act", "quick_gelu"), "hidden_act", source)
    return parse_config(CLIPTextConfig, raw, source, CONFIG_IGNORED)


def write_config(config: CLIPTextConfig) -> dict[str, Any]:
    """The config.json transformers' `CLIPTextModel.from_pretrained` reads back to `config`."""
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
            **dataclasses.asdict(config)}


# FLUX.1's CLIP ViT-L/14 text tower (see presets_text.FLUX_CLIP_L_CONFIG).
CLIP_L_FLUX = read_config(FLUX_CLIP_L_CONFIG, "presets_text.FLUX_CLIP_L_CONFIG")


class CLIPTextOutput(NamedTuple):
    last_hidden_state: jax.Array  # (batch, seq, hidden), after final_layer_norm
    pooler_output: jax.Array  # (batch, hidden): last_hidden_state at the EOS position


class CLIPTextEmbeddings(nnx.Module):
    """Token embedding plus learned absolute position embedding (positions 0..seq-1)."""

    def __init__(self, config: CLIPTextConfig, *, dtype: Any, rngs: nnx.Rngs):
        d = config.hidden_size
        self.token_embedding = Embedding(config.vocab_size, d, dtype=dtype, rngs=rngs)
        self.position_embedding = Embedding(config.max_position_embeddings, d, dtype=dtype,
                                            rngs=rngs)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """input_ids: `(batch, seq)` -> `(batch, seq, hidden)`."""
        seq = input_ids.shape[-1]
        max_pos = self.position_embedding.embedding.shape[0]
        if seq > max_pos:
            raise ValueError(f"sequence length {seq} exceeds max_position_embeddings {max_pos}")
        return self.token_embedding(input_ids) + self.position_embedding(jnp.arange(seq))


class CLIPAttention(nnx.Module):
    """Multi-head self-attention with biased q/k/v/out projections, scale 1/sqrt(head_dim)."""

    def __init__(self, dim: int, heads: int, *, dtype: Any, rngs: nnx.Rngs):
        self.heads, self.head_dim = heads, dim // heads
        self.k_proj = Linear(dim, dim, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(dim, dim, dtype=dtype, rngs=rngs)
        self.q_proj = Linear(dim, dim, dtype=dtype, rngs=rngs)
        self.out_proj = Linear(dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """x: `(batch, seq, dim)`; mask: bool, broadcastable to `(batch, heads, seq, seq)`."""
        shape = (*x.shape[:-1], self.heads, self.head_dim)
        q = self.q_proj(x).reshape(shape)
        k = self.k_proj(x).reshape(shape)
        v = self.v_proj(x).reshape(shape)
        out = attention(q, k, v, mask).astype(x.dtype)
        return self.out_proj(out.reshape(*x.shape[:-1], -1))


class CLIPMLP(nnx.Module):
    """`fc2(act(fc1(x)))`, act by transformers name (quick_gelu for OpenAI CLIP)."""

    def __init__(self, dim: int, hidden: int, act: str, *, dtype: Any, rngs: nnx.Rngs):
        self.act = act
        self.fc1 = Linear(dim, hidden, dtype=dtype, rngs=rngs)
        self.fc2 = Linear(hidden, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(activation(self.act)(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-LN block: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`."""

    def __init__(self, config: CLIPTextConfig, *, dtype: Any, rngs: nnx.Rngs):
        d, eps = config.hidden_size, config.layer_norm_eps
        self.self_attn = CLIPAttention(d, config.num_attention_heads, dtype=dtype, rngs=rngs)
        self.layer_norm1 = LayerNorm(d, eps=eps, dtype=dtype)
        self.mlp = CLIPMLP(d, config.intermediate_size, config.hidden_act, dtype=dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(d, eps=eps, dtype=dtype)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype: Any, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [CLIPEncoderLayer(config, dtype=dtype, rngs=rngs)
             for _ in range(config.num_hidden_layers)]
        )

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(x, mask)
        return x


def causal_mask(seq: int, attention_mask: jax.Array | None) -> jax.Array:
    """Bool mask `(batch or 1, 1, seq, seq)`: causal, and keys where `attention_mask != 0`.

    A query that can see no key (a pad token before the first real one, with left padding)
    gets uniform attention over all keys, like transformers' eager path; no valid position
    attends to it, so valid outputs do not depend on it.
    """
    mask = jnp.tril(jnp.ones((seq, seq), bool))[None, None]
    if attention_mask is not None:
        mask = mask & (attention_mask != 0)[:, None, None, :]
    return mask


def pool_eos(hidden: jax.Array, input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """hidden `(batch, seq, d)` at each row's EOS position -> `(batch, d)`, transformers' rule.

    eos_token_id == 2 (legacy configs, FLUX's): the position of the largest id (CLIP's EOS,
    49407, is the largest). Otherwise the first position equal to eos_token_id (position 0 when
    a row has none). Ties resolve to the first position, as torch.argmax does.
    """
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        idx = jnp.argmax(input_ids, axis=-1)
    else:
        idx = jnp.argmax(input_ids == eos_token_id, axis=-1)
    return jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]


class CLIPTextTransformer(nnx.Module):
    """transformers' `CLIPTextTransformer` (the `text_model` of CLIPTextModel)."""

    def __init__(self, config: CLIPTextConfig, *, dtype: Any, rngs: nnx.Rngs):
        self.eos_token_id = config.eos_token_id
        self.embeddings = CLIPTextEmbeddings(config, dtype=dtype, rngs=rngs)
        self.encoder = CLIPEncoder(config, dtype=dtype, rngs=rngs)
        self.final_layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps,
                                          dtype=dtype)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None
                 ) -> CLIPTextOutput:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {input_ids.shape}")
        x = self.embeddings(input_ids)
        x = self.encoder(x, causal_mask(input_ids.shape[1], attention_mask))
        x = self.final_layer_norm(x)
        return CLIPTextOutput(x, pool_eos(x, input_ids, self.eos_token_id))


class CLIPTextModel(nnx.Module):
    """transformers' `CLIPTextModel`. Parameters in `dtype`; LayerNorm stats and softmax in f32."""

    def __init__(self, config: CLIPTextConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.text_model = CLIPTextTransformer(config, dtype=dtype, rngs=rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None
                 ) -> CLIPTextOutput:
        """input_ids: `(batch, seq)` int, seq <= max_position_embeddings; attention_mask:
        `(batch, seq)`, nonzero = real token (keys only, combined with the causal mask), or None
        (FluxPipeline passes none). Returns `CLIPTextOutput`.
        """
        return self.text_model(input_ids, attention_mask)
