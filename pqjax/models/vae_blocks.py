"""The building blocks of diffusers' `AutoencoderKL` in Flax NNX, channels-last (NHWC).

Each class mirrors the diffusers module of the same name (attribute names included), for the
configuration AutoencoderKL builds it with: no timestep embedding, `output_scale_factor` 1,
GroupNorm eps 1e-6, single-head mid-block attention. Activations are `(b, h, w, c)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pqjax.models.conv import Conv2d, GroupNorm, PointwiseConv
from pqjax.models.layers import Identity, Linear, attention

EPS = 1e-6  # AutoencoderKL passes resnet_eps=1e-6 to every GroupNorm


def mish(x: jax.Array) -> jax.Array:
    return x * jnp.tanh(jax.nn.softplus(x))


# diffusers' `get_activation` names; torch's nn.GELU default is the exact (erf) GELU.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "mish": mish,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    try:
        return ACTIVATIONS[name.lower()]
    except KeyError:
        raise ValueError(
            f"act_fn {name!r} is not supported; choose from {sorted(ACTIVATIONS)}"
        ) from None


class ResnetBlock2D(nnx.Module):
    """`norm1 -> act -> conv1 -> norm2 -> act -> conv2`, plus a 1x1 `conv_shortcut` on the skip
    path when the channel count changes. x: `(b, h, w, in)` -> `(b, h, w, out)`."""

    def __init__(
        self, in_channels: int, out_channels: int, *, groups: int, act_fn: str, dtype: Any,
        rngs: nnx.Rngs,
    ):
        self.act_fn = act_fn
        self.norm1 = GroupNorm(groups, in_channels, eps=EPS, dtype=dtype)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1, dtype=dtype, rngs=rngs)
        self.norm2 = GroupNorm(groups, out_channels, eps=EPS, dtype=dtype)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1, dtype=dtype, rngs=rngs)
        self.conv_shortcut = nnx.data(
            PointwiseConv(in_channels, out_channels, dtype=dtype, rngs=rngs)
            if in_channels != out_channels
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        act = activation(self.act_fn)
        h = self.conv1(act(self.norm1(x)))
        h = self.conv2(act(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class AttentionBlock(nnx.Module):
    """diffusers `Attention` as the VAE mid-block uses it: GroupNorm, one head spanning all
    channels, output projection, residual. x: `(b, h, w, c)` -> same shape."""

    def __init__(self, channels: int, *, groups: int, dtype: Any, rngs: nnx.Rngs):
        self.group_norm = GroupNorm(groups, channels, eps=EPS, dtype=dtype)
        self.to_q = Linear(channels, channels, dtype=dtype, rngs=rngs)
        self.to_k = Linear(channels, channels, dtype=dtype, rngs=rngs)
        self.to_v = Linear(channels, channels, dtype=dtype, rngs=rngs)
        self.to_out = nnx.List([Linear(channels, channels, dtype=dtype, rngs=rngs), Identity()])

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        tokens = self.group_norm(x).reshape(b, h * w, 1, c)  # one head of width c
        q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
        out = attention(q, k, v).astype(q.dtype).reshape(b, h * w, c)
        for layer in self.to_out:
            out = layer(out)
        return x + out.reshape(b, h, w, c)


class Downsample2D(nnx.Module):
    """Stride-2 3x3 conv with diffusers' asymmetric zero padding: none top/left, one
    bottom/right (`downsample_padding=0`). x: `(b, h, w, c)` -> `(b, h // 2, w // 2, c)`."""

    def __init__(self, channels: int, *, dtype: Any, rngs: nnx.Rngs):
        self.conv = Conv2d(
            channels, channels, 3, stride=2, padding=((0, 1), (0, 1)), dtype=dtype, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv. x: `(b, h, w, c)` -> `(b, 2h, 2w, c)`."""

    def __init__(self, channels: int, *, dtype: Any, rngs: nnx.Rngs):
        self.conv = Conv2d(channels, channels, 3, padding=1, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)


class DownEncoderBlock2D(nnx.Module):
    """`num_layers` resnets, then (except in the last block) one `Downsample2D`."""

    def __init__(
        self, in_channels: int, out_channels: int, *, num_layers: int, add_downsample: bool,
        groups: int, act_fn: str, dtype: Any, rngs: nnx.Rngs,
    ):
        self.resnets = nnx.List([
            ResnetBlock2D(
                in_channels if i == 0 else out_channels, out_channels, groups=groups,
                act_fn=act_fn, dtype=dtype, rngs=rngs,
            )
            for i in range(num_layers)
        ])
        down = [Downsample2D(out_channels, dtype=dtype, rngs=rngs)] if add_downsample else None
        self.downsamplers = nnx.data(None if down is None else nnx.List(down))

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        for down in self.downsamplers or ():
            x = down(x)
        return x


class UpDecoderBlock2D(nnx.Module):
    """`num_layers` resnets, then (except in the last block) one `Upsample2D`."""

    def __init__(
        self, in_channels: int, out_channels: int, *, num_layers: int, add_upsample: bool,
        groups: int, act_fn: str, dtype: Any, rngs: nnx.Rngs,
    ):
        self.resnets = nnx.List([
            ResnetBlock2D(
                in_channels if i == 0 else out_channels, out_channels, groups=groups,
                act_fn=act_fn, dtype=dtype, rngs=rngs,
            )
            for i in range(num_layers)
        ])
        self.upsamplers = nnx.data(
            nnx.List([Upsample2D(out_channels, dtype=dtype, rngs=rngs)]) if add_upsample else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        for up in self.upsamplers or ():
            x = up(x)
        return x


class UNetMidBlock2D(nnx.Module):
    """`resnets[0] -> attentions[0] -> resnets[1]`; without attention the slot is an `Identity`
    (torch keeps a `None` there, which holds no parameters either)."""

    def __init__(
        self, channels: int, *, add_attention: bool, groups: int, act_fn: str, dtype: Any,
        rngs: nnx.Rngs,
    ):
        self.resnets = nnx.List([
            ResnetBlock2D(channels, channels, groups=groups, act_fn=act_fn, dtype=dtype, rngs=rngs)
            for _ in range(2)
        ])
        self.attentions = nnx.List([
            AttentionBlock(channels, groups=groups, dtype=dtype, rngs=rngs)
            if add_attention
            else Identity()
        ])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attn(x))
        return x
