"""Pieces shared by the decoder-only text encoders (Gemma-2 for SANA, Qwen3 for Z-Image).

Both are pre-norm transformers with rotary positions (RoPE, the "rotate half" layout of
transformers: the first and second halves of each head form the rotated pairs), grouped-query
attention (`kv_heads` key/value heads each shared by `heads // kv_heads` query heads) and a
causal mask combined with the tokenizer's padding mask. A diffusion pipeline reads one hidden
state and never generates, so there is no KV cache.

    cos, sin = rope_tables(positions, head_dim, theta)     # (batch, seq, head_dim) float32
    q = apply_rope(q, cos, sin)                           # q: (batch, seq, heads, head_dim)
    mask = causal_mask(attention_mask, seq, window=None)  # (batch, 1, seq, seq) bool
    out = gqa_attention(q, k, v, mask, scale=hd**-0.5, softcap=None)
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from pqjax.models.configs import ConfigError
from pqjax.models.layers import Linear
from pqjax.models.presets_text import activation, parse_config


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin `(batch, seq, head_dim)` float32 for integer `positions` `(batch, seq)`.

    inv_freq[i] = theta^(-2i / head_dim) for i < head_dim / 2, repeated for both halves.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x `(batch, seq, heads, head_dim)` rotated by the tables, in x's dtype (as transformers)."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def causal_mask(attention_mask: jax.Array | None, batch: int, seq: int,
                window: int | None = None) -> jax.Array:
    """`(batch, 1, seq, seq)` bool, True = query i may attend key j.

    j <= i; with a sliding `window`, also i - j < window; and key j is a real token
    (`attention_mask[b, j] != 0`) when a padding mask is given.
    """
    i = jnp.arange(seq)[:, None]
    j = jnp.arange(seq)[None, :]
    allowed = j <= i
    if window is not None:
        allowed = allowed & (j > i - window)
    allowed = jnp.broadcast_to(allowed[None, None], (batch, 1, seq, seq))
    if attention_mask is not None:
        allowed = allowed & (attention_mask != 0)[:, None, None, :]
    return allowed


def gqa_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, scale: float,
                  softcap: float | None = None) -> jax.Array:
    """Grouped-query attention with optional tanh soft-capping of the logits.

    q `(batch, seq, heads, hd)`; k, v `(batch, seq, kv_heads, hd)`; mask `(batch, 1, seq, seq)`.
    Logits `softcap * tanh(s / softcap)` of `s = scale * q.k` (Gemma-2), masked, softmax in
    float32. Returns `(batch, seq, heads, hd)` in q's dtype.
    """
    b, s, heads, hd = q.shape
    groups = heads // k.shape[2]
    qg = q.reshape(b, s, k.shape[2], groups, hd)
    logits = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        logits = jnp.tanh(logits / softcap) * softcap
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, s, heads, hd).astype(q.dtype)


class LMRMSNorm(nnx.Module):
    """The decoder LMs' RMSNorm, statistics in float32.

    Qwen3 (`offset=0`): `weight * (x / rms(x)).astype(dtype)`, weight initialised to 1.
    Gemma-2 (`offset=1`): `(x / rms(x) * (1 + weight)).astype(dtype)` in float32, weight
    initialised to 0. x: `(..., dim)`.
    """

    TORCH_PARAMS: ClassVar[dict[str, tuple[str, str]]] = {"weight": ("weight", "same")}

    def __init__(self, dim: int, *, eps: float, offset: float, dtype: Any = jnp.float32):
        self.eps = eps
        self.offset = offset
        self.weight = nnx.Param(jnp.full((dim,), 1.0 - offset, dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        w = self.weight[...]
        if self.offset:
            return (y * (self.offset + w.astype(jnp.float32))).astype(x.dtype)
        return w * y.astype(x.dtype)


def rope_theta(raw: dict[str, Any], source: str, default: float) -> float:
    """RoPE base from a config.json: transformers 5 `rope_parameters`, 4.x `rope_theta`.

    Only the default (unscaled) RoPE is supported: both encoders ship with it.
    """
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: rope_parameters must be an object, got {params!r}")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise ConfigError(f"{source}: rope_type {kind!r} is not supported (only 'default')")
    theta = params.get("rope_theta", raw.get("rope_theta", default))
    if isinstance(theta, bool) or not isinstance(theta, int | float) or theta <= 1:
        raise ConfigError(f"{source}: rope_theta must be a number > 1, got {theta!r}")
    return float(theta)


def check_positive_ints(config: Any, names: tuple[str, ...], source: str) -> None:
    """Every named field is an int > 0 (JSON `1.5`, `"2"`, `null`, `true` are refused)."""
    for name in names:
        v = getattr(config, name)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(f"{source}: {name} must be a positive integer, got {v!r}")


def check_lm_shape(config: Any, source: str) -> None:
    """The sizes both LM configs share are positive ints, and the query heads group evenly
    over the key/value heads."""
    check_positive_ints(config, ("vocab_size", "hidden_size", "intermediate_size",
                                 "num_hidden_layers", "num_attention_heads",
                                 "num_key_value_heads", "head_dim"), source)
    if config.num_attention_heads % config.num_key_value_heads:
        raise ConfigError(f"{source}: num_attention_heads {config.num_attention_heads} is not a "
                          f"multiple of num_key_value_heads {config.num_key_value_heads}")


def read_lm_config(cls: type, raw: Any, source: str, model_type: str,
                   ignored: tuple[str, ...], default_theta: float) -> Any:
    """A transformers LM config.json (4.x `rope_theta` or 5.x `rope_parameters`) as `cls`,
    whose `rope_theta` field takes the RoPE base; unknown fields are errors."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a config must be a JSON object, got {type(raw).__name__}")
    if raw.get("model_type", model_type) != model_type:
        raise ConfigError(f"{source}: model_type {raw.get('model_type')!r} is not {model_type!r}")
    cfg = parse_config(cls, raw, source, ignored)
    return dataclasses.replace(cfg, rope_theta=rope_theta(raw, source, default_theta))


def write_lm_config(config: Any, architecture: str, model_type: str) -> dict[str, Any]:
    """The config.json transformers' `<architecture>.from_pretrained` reads back to `config`."""
    fields = {k: list(v) if isinstance(v, tuple) else v
              for k, v in dataclasses.asdict(config).items()}
    theta = fields.pop("rope_theta")
    return {"architectures": [architecture], "model_type": model_type, **fields,
            "rope_parameters": {"rope_type": "default", "rope_theta": theta}}


class GatedMLP(nnx.Module):
    """`down(act(gate x) * up x)`, no biases (Gemma-2: gelu_tanh; Qwen3: silu)."""

    def __init__(self, d: int, ff: int, act: str, *, dtype: Any, rngs: nnx.Rngs):
        self.act = act
        self.gate_proj = Linear(d, ff, use_bias=False, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(d, ff, use_bias=False, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(ff, d, use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(activation(self.act)(self.gate_proj(x)) * self.up_proj(x))
