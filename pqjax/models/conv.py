"""Channels-last convolution, group norm and embedding layers with torch parameter layouts.

Activations are NHWC inside every model; models that mirror a torch NCHW API transpose at
their boundary.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from pqjax.models.layers import Linear, TorchParams, torch_uniform


class Conv2d(nnx.Module):
    """2-D convolution. x: `(b, h, w, in)` -> `(b, h', w', out)`.

    kernel HWIO `(kh, kw, in/groups, out)`.

    `padding` is symmetric `int` or explicit `((top, bottom), (left, right))`.
    """

    TORCH_PARAMS: ClassVar[TorchParams] = {"kernel": ("weight", "conv2d"), "bias": ("bias", "same")}

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int | tuple[tuple[int, int], tuple[int, int]] = 0,
        groups: int = 1,
        use_bias: bool = True,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"channels {in_channels}->{out_channels} not divisible by groups {groups}"
            )
        self.stride, self.groups = stride, groups
        self.padding = (
            ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding
        )
        fan_in = in_channels // groups * kernel_size * kernel_size
        key_w, key_b = jax.random.split(rngs.params())
        shape = (kernel_size, kernel_size, in_channels // groups, out_channels)
        self.kernel = nnx.Param(torch_uniform(key_w, shape, fan_in, dtype))
        self.bias = nnx.data(
            nnx.Param(torch_uniform(key_b, (out_channels,), fan_in, dtype)) if use_bias else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        y = jax.lax.conv_general_dilated(
            x.astype(kernel.dtype),
            kernel,
            window_strides=(self.stride, self.stride),
            padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=self.groups,
        )
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class PointwiseConv(Linear):
    """A 1x1 convolution held as a `Linear` (so it calibrates and quantizes like one).

    torch weight `(out, in, 1, 1)` <-> kernel `(in, out)`; x: `(..., in)` channels-last.
    """

    TORCH_PARAMS: ClassVar[TorchParams] = {
        "kernel": ("weight", "conv1x1"),
        "bias": ("bias", "same"),
    }


class GroupNorm(nnx.Module):
    """GroupNorm over channels-last input `(b, ..., c)`; statistics in float32."""

    TORCH_PARAMS: ClassVar[TorchParams] = {"scale": ("weight", "same"), "bias": ("bias", "same")}

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        *,
        eps: float = 1e-6,
        affine: bool = True,
        dtype: Any = jnp.float32,
    ):
        if num_channels % num_groups:
            raise ValueError(f"{num_channels} channels not divisible into {num_groups} groups")
        self.num_groups, self.eps = num_groups, eps
        self.scale = nnx.data(nnx.Param(jnp.ones((num_channels,), dtype)) if affine else None)
        self.bias = nnx.data(nnx.Param(jnp.zeros((num_channels,), dtype)) if affine else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, c = x.shape[0], x.shape[-1]
        g = x.astype(jnp.float32).reshape(b, -1, self.num_groups, c // self.num_groups)
        mean = jnp.mean(g, axis=(1, 3), keepdims=True)
        var = jnp.mean(jnp.square(g - mean), axis=(1, 3), keepdims=True)
        y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        if self.scale is not None:
            y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class Embedding(nnx.Module):
    """Token embedding table `(num_embeddings, dim)`; ids `(...)` -> `(..., dim)`."""

    TORCH_PARAMS: ClassVar[TorchParams] = {"embedding": ("weight", "same")}

    def __init__(self, num_embeddings: int, dim: int, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.embedding = nnx.Param(
            jax.random.normal(rngs.params(), (num_embeddings, dim)).astype(dtype)
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0)
