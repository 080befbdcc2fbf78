"""The blocks of diffusers' DC-AE decoder (`AutoencoderDC`), channels-last.

- `ResBlock`: `x + norm(conv2(act(conv1(x))))`.
- `EfficientViTBlock`: multi-scale ReLU linear attention (`SanaMultiscaleLinearAttention`,
  with its residual), then the gated inverted-bottleneck conv `GLUMBConv` (with its residual).
- `DCUpBlock2d`: 2x upsampling by nearest interpolation + conv, or conv + pixel shuffle; the
  shortcut repeats each input channel and pixel-shuffles, so the block starts near identity.

Module names mirror diffusers' (`conv1`, `norm`, `attn.to_qkv_multiscale.0.proj_in`, ...).
x: `(b, h, w, c)` everywhere.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from pqjax.models.conv import Conv2d, PointwiseConv
from pqjax.models.layers import Linear, TorchParams

# diffusers' `get_activation` names (its ACT2CLS); "gelu" is the exact erf form.
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
}
LINEAR_ATTENTION_EPS = 1e-15  # diffusers' SanaMultiscaleLinearAttention default


class ChannelRMSNorm(nnx.Module):
    """diffusers' `RMSNorm(c, eps=1e-5, elementwise_affine=True, bias=True)` over channels:
    `x * rsqrt(mean(x^2) + eps) * weight + bias`, the statistics in float32."""

    TORCH_PARAMS: ClassVar[TorchParams] = {"weight": ("weight", "same"), "bias": ("bias", "same")}

    def __init__(self, dim: int, *, eps: float = 1e-5, dtype: Any = jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        w = self.weight[...]
        return y.astype(w.dtype) * w + self.bias[...]


def pixel_shuffle(x: jax.Array, r: int) -> jax.Array:
    """torch `pixel_shuffle` in NHWC: `(b, h, w, c r r)` -> `(b, h r, w r, c)`, input channel
    `c r^2 + i r + j` landing at `(h r + i, w r + j)` of channel c."""
    b, h, w, crr = x.shape
    c = crr // (r * r)
    x = x.reshape(b, h, w, c, r, r).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, h * r, w * r, c)


class ResBlock(nnx.Module):
    def __init__(self, channels: int, act: str, *, dtype: Any, rngs: nnx.Rngs):
        self.act = act
        self.conv1 = Conv2d(channels, channels, 3, padding=1, dtype=dtype, rngs=rngs)
        self.conv2 = Conv2d(channels, channels, 3, padding=1, use_bias=False, dtype=dtype,
                            rngs=rngs)
        self.norm = ChannelRMSNorm(channels, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.norm(self.conv2(ACTIVATIONS[self.act](self.conv1(x))))


class MultiscaleProjection(nnx.Module):
    """A depthwise k x k conv, then a 1x1 conv grouped per (q|k|v, head): one more scale."""

    def __init__(self, channels: int, heads: int, kernel_size: int, *, dtype: Any,
                 rngs: nnx.Rngs):
        self.proj_in = Conv2d(channels, channels, kernel_size, padding=kernel_size // 2,
                              groups=channels, use_bias=False, dtype=dtype, rngs=rngs)
        self.proj_out = Conv2d(channels, channels, 1, groups=3 * heads, use_bias=False,
                               dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj_out(self.proj_in(x))


class MultiscaleLinearAttention(nnx.Module):
    """diffusers' `SanaMultiscaleLinearAttention` with `residual_connection=True`.

    q, k, v (each `heads * head_dim` channels) are concatenated and, per extra scale, passed
    through a `MultiscaleProjection`; the channels then split into groups of `3 * head_dim`
    (q | k | v of one group), ReLU on q and k. Linear attention
    `(v k^T q) / (1 k^T q + eps)` in float32 where h*w > head_dim, else the quadratic form
    `v (k^T q / sum_n k^T q)`; then `to_out`, the RMS norm and the residual.
    """

    def __init__(self, channels: int, head_dim: int, kernel_sizes: tuple[int, ...], *,
                 dtype: Any, rngs: nnx.Rngs):
        heads = channels // head_dim
        inner = heads * head_dim
        self.head_dim = head_dim
        self.to_q = Linear(channels, inner, use_bias=False, dtype=dtype, rngs=rngs)
        self.to_k = Linear(channels, inner, use_bias=False, dtype=dtype, rngs=rngs)
        self.to_v = Linear(channels, inner, use_bias=False, dtype=dtype, rngs=rngs)
        self.to_qkv_multiscale = nnx.List([
            MultiscaleProjection(3 * inner, heads, k, dtype=dtype, rngs=rngs)
            for k in kernel_sizes
        ])
        self.to_out = Linear(inner * (1 + len(kernel_sizes)), channels, use_bias=False,
                             dtype=dtype, rngs=rngs)
        self.norm_out = ChannelRMSNorm(channels, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, _ = x.shape
        hd = self.head_dim
        qkv = jnp.concatenate([self.to_q(x), self.to_k(x), self.to_v(x)], axis=-1)
        qkv = jnp.concatenate([qkv] + [m(qkv) for m in self.to_qkv_multiscale], axis=-1)
        linear = h * w > hd
        if linear:
            qkv = qkv.astype(jnp.float32)
        groups = qkv.reshape(b, h * w, -1, 3 * hd)  # (b, n, groups, 3 hd)
        q = jax.nn.relu(groups[..., :hd])
        k = jax.nn.relu(groups[..., hd:2 * hd])
        v = groups[..., 2 * hd:]
        if linear:
            v1 = jnp.concatenate([v, jnp.ones_like(v[..., :1])], axis=-1)  # (b, n, g, hd+1)
            kv = jnp.einsum("bngd,bnge->bgde", v1, k)  # (b, g, hd+1, hd)
            out = jnp.einsum("bgde,bnge->bngd", kv, q)  # (b, n, g, hd+1)
            out = (out[..., :-1] / (out[..., -1:] + LINEAR_ATTENTION_EPS)).astype(x.dtype)
        else:
            scores = jnp.einsum("bmgd,bngd->bgmn", k, q).astype(jnp.float32)  # keys m, queries n
            scores = scores / (jnp.sum(scores, axis=2, keepdims=True) + LINEAR_ATTENTION_EPS)
            out = jnp.einsum("bmgd,bgmn->bngd", v, scores.astype(v.dtype))
        out = self.to_out(out.reshape(b, h, w, -1))
        return x + self.norm_out(out)


class GLUMBConv(nnx.Module):
    """diffusers' `GLUMBConv(c, c, expand_ratio=4, norm_type="rms_norm")` with its residual:
    `x + norm(point(v * silu(g)))`, `[v; g] = depth(silu(inverted(x)))`."""

    def __init__(self, channels: int, *, expand_ratio: float = 4.0, dtype: Any, rngs: nnx.Rngs):
        hidden = int(expand_ratio * channels)
        self.hidden = hidden
        self.conv_inverted = PointwiseConv(channels, 2 * hidden, dtype=dtype, rngs=rngs)
        self.conv_depth = Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden,
                                 dtype=dtype, rngs=rngs)
        self.conv_point = PointwiseConv(hidden, channels, use_bias=False, dtype=dtype, rngs=rngs)
        self.norm = ChannelRMSNorm(channels, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv_depth(jax.nn.silu(self.conv_inverted(x)))
        value, gate = y[..., : self.hidden], y[..., self.hidden:]
        return x + self.norm(self.conv_point(value * jax.nn.silu(gate)))


class EfficientViTBlock(nnx.Module):
    def __init__(self, channels: int, head_dim: int, kernel_sizes: tuple[int, ...], *,
                 dtype: Any, rngs: nnx.Rngs):
        self.attn = MultiscaleLinearAttention(channels, head_dim, kernel_sizes, dtype=dtype,
                                              rngs=rngs)
        self.conv_out = GLUMBConv(channels, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv_out(self.attn(x))


class DCUpBlock2d(nnx.Module):
    """2x upsampling `in -> out` channels; `shortcut` adds the channel-repeated pixel shuffle."""

    def __init__(self, in_channels: int, out_channels: int, *, interpolate: bool,
                 shortcut: bool, dtype: Any, rngs: nnx.Rngs):
        self.interpolate, self.shortcut = interpolate, shortcut
        self.repeats = out_channels * 4 // in_channels
        conv_out = out_channels if interpolate else 4 * out_channels
        self.conv = Conv2d(in_channels, conv_out, 3, padding=1, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.interpolate:
            y = self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))  # nearest, 2x
        else:
            y = pixel_shuffle(self.conv(x), 2)
        if self.shortcut:
            y = y + pixel_shuffle(jnp.repeat(x, self.repeats, axis=-1), 2)
        return y
