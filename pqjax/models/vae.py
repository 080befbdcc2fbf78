"""diffusers' `AutoencoderKL` (the FLUX / SD VAE) in Flax NNX.

The module tree mirrors diffusers' names (`encoder.down_blocks.0.resnets.1.conv2`, ...), so
checkpoints map onto it by rule (`convert/keymaps/vae.py`). Inside, activations are
channels-last; the public methods take and return NCHW like diffusers:

    vae = convert.load_model("FLUX.1-dev/vae")                # AutoencoderKL
    image = vae.decode(latents_to_vae(latents, vae.config))   # (b, 16, h, w) -> (b, 3, 8h, 8w)
    dist = vae.encode(image)                                  # DiagonalGaussian over (b, 16, h, w)
    latents = vae_to_latents(dist.sample(key), vae.config)

`encoder` / `decoder` are also callable directly on NHWC arrays.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pqjax.models.conv import Conv2d, GroupNorm, PointwiseConv
from pqjax.models.vae_blocks import (
    EPS,
    DownEncoderBlock2D,
    UNetMidBlock2D,
    UpDecoderBlock2D,
    activation,
)

DOWN_BLOCK_TYPES = ("DownEncoderBlock2D",)
UP_BLOCK_TYPES = ("UpDecoderBlock2D",)


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """diffusers' AutoencoderKL config. Defaults are diffusers' (so a config.json that omits a
    field means what it means to diffusers); FLUX.1's VAE is `FLUX_VAE_CONFIG`.

    `sample_size`, `force_upcast`, `latents_mean` / `latents_std` do not change the network;
    they are kept so configs round-trip. The FLUX pipeline uses scaling/shift only.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        n = len(self.block_out_channels)
        if n == 0:
            raise ValueError("block_out_channels must not be empty")
        for field, types, allowed in (
            ("down_block_types", self.down_block_types, DOWN_BLOCK_TYPES),
            ("up_block_types", self.up_block_types, UP_BLOCK_TYPES),
        ):
            bad = [t for t in types if t not in allowed]
            if bad:
                raise ValueError(f"{field}: unsupported block type(s) {bad}; supported: {allowed}")
            if len(types) != n:
                raise ValueError(
                    f"{field} has {len(types)} entries but block_out_channels has {n}; "
                    "they must match"
                )
        activation(self.act_fn)  # raises on an unknown name
        bad_ch = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad_ch:
            raise ValueError(
                f"block_out_channels {bad_ch} not divisible by norm_num_groups "
                f"{self.norm_num_groups}"
            )
        if self.layers_per_block < 1:
            raise ValueError(f"layers_per_block must be >= 1, got {self.layers_per_block}")

    @property
    def downscale(self) -> int:
        """Pixels per latent along each axis (8 for FLUX)."""
        return 2 ** (len(self.block_out_channels) - 1)


# FLUX.1-dev / FLUX.1-schnell `vae/config.json` (83.8M parameters).
FLUX_VAE_CONFIG = AutoencoderKLConfig(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=16,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    latents_mean=None,
    latents_std=None,
    force_upcast=True,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=True,
)


class Encoder(nnx.Module):
    """Image `(b, h, w, in_channels)` -> moments `(b, h/f, w/f, 2 * latent_channels)`, NHWC,
    f = `config.downscale`."""

    def __init__(self, config: AutoencoderKLConfig, *, dtype: Any, rngs: nnx.Rngs):
        c = config
        ch, groups = c.block_out_channels, c.norm_num_groups
        self.conv_in = Conv2d(c.in_channels, ch[0], 3, padding=1, dtype=dtype, rngs=rngs)
        self.down_blocks = nnx.List([
            DownEncoderBlock2D(
                ch[max(i - 1, 0)], ch[i], num_layers=c.layers_per_block,
                add_downsample=i < len(ch) - 1, groups=groups, act_fn=c.act_fn, dtype=dtype,
                rngs=rngs,
            )
            for i in range(len(ch))
        ])
        self.mid_block = UNetMidBlock2D(
            ch[-1], add_attention=c.mid_block_add_attention, groups=groups, act_fn=c.act_fn,
            dtype=dtype, rngs=rngs,
        )
        self.conv_norm_out = GroupNorm(groups, ch[-1], eps=EPS, dtype=dtype)
        self.conv_out = Conv2d(ch[-1], 2 * c.latent_channels, 3, padding=1, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        # diffusers' conv_act is SiLU here whatever act_fn says.
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """Latents `(b, h, w, latent_channels)` -> image `(b, h*f, w*f, out_channels)`, NHWC."""

    def __init__(self, config: AutoencoderKLConfig, *, dtype: Any, rngs: nnx.Rngs):
        c = config
        rev, groups = tuple(reversed(c.block_out_channels)), c.norm_num_groups
        self.conv_in = Conv2d(c.latent_channels, rev[0], 3, padding=1, dtype=dtype, rngs=rngs)
        self.mid_block = UNetMidBlock2D(
            rev[0], add_attention=c.mid_block_add_attention, groups=groups, act_fn=c.act_fn,
            dtype=dtype, rngs=rngs,
        )
        self.up_blocks = nnx.List([
            UpDecoderBlock2D(
                rev[max(i - 1, 0)], rev[i], num_layers=c.layers_per_block + 1,
                add_upsample=i < len(rev) - 1, groups=groups, act_fn=c.act_fn, dtype=dtype,
                rngs=rngs,
            )
            for i in range(len(rev))
        ])
        self.conv_norm_out = GroupNorm(groups, rev[-1], eps=EPS, dtype=dtype)
        self.conv_out = Conv2d(rev[-1], c.out_channels, 3, padding=1, dtype=dtype, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DiagonalGaussian:
    """diffusers' `DiagonalGaussianDistribution`: mean and log-variance `(b, c, h, w)`, the
    log-variance clamped to [-30, 20] as diffusers does. A pytree, so jit can return it."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array, axis: int = 1) -> DiagonalGaussian:
        """Split `moments` (mean first, then logvar) along the channel `axis`."""
        mean, logvar = jnp.split(moments, 2, axis=axis)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        """`mean + std * eps`, eps ~ N(0, 1) drawn from `key`."""
        eps = jax.random.normal(key, self.mean.shape, jnp.float32).astype(self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self) -> jax.Array:
        """KL divergence to N(0, 1) per sample, `(b,)`."""
        kl = jnp.square(self.mean) + self.var - 1.0 - self.logvar
        return 0.5 * jnp.sum(kl.astype(jnp.float32), axis=(1, 2, 3))


def _nchw_to_nhwc(x: jax.Array, channels: int, what: str) -> jax.Array:
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"{what} must be NCHW with {channels} channels, got shape {x.shape}")
    return jnp.transpose(x, (0, 2, 3, 1))


class AutoencoderKL(nnx.Module):
    """The KL autoencoder; NCHW in and out like diffusers (see module docstring)."""

    def __init__(
        self, config: AutoencoderKLConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs
    ):
        self.config = config
        c, lat = config, config.latent_channels
        self.encoder = Encoder(c, dtype=dtype, rngs=rngs)
        self.decoder = Decoder(c, dtype=dtype, rngs=rngs)
        # 1x1 convs, present in SD-style VAEs and absent in FLUX's.
        self.quant_conv = nnx.data(
            PointwiseConv(2 * lat, 2 * lat, dtype=dtype, rngs=rngs) if c.use_quant_conv else None
        )
        self.post_quant_conv = nnx.data(
            PointwiseConv(lat, lat, dtype=dtype, rngs=rngs) if c.use_post_quant_conv else None
        )

    def encode_moments(self, x: jax.Array) -> jax.Array:
        """x: image `(b, in_channels, H, W)` -> moments `(b, h, w, 2 * latent_channels)`, NHWC,
        `h = H // f` for H divisible by f = `config.downscale` (diffusers' sizes otherwise)."""
        h = self.encoder(_nchw_to_nhwc(x, self.config.in_channels, "encode input"))
        return h if self.quant_conv is None else self.quant_conv(h)

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """x: image `(b, in_channels, H, W)` -> posterior over latents `(b, latent_channels, h, w)`
        (diffusers' `encode(x).latent_dist`)."""
        moments = jnp.transpose(self.encode_moments(x), (0, 3, 1, 2))
        return DiagonalGaussian.from_moments(moments, axis=1)

    def decode(self, z: jax.Array) -> jax.Array:
        """z: VAE-space latents `(b, latent_channels, h, w)` -> image `(b, out_channels, h*f,
        w*f)` (diffusers' `decode(z).sample`). Un-scale pipeline latents first
        (`latents_to_vae`)."""
        z = _nchw_to_nhwc(z, self.config.latent_channels, "decode input")
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return jnp.transpose(self.decoder(z), (0, 3, 1, 2))

    def __call__(self, sample: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """diffusers' forward: encode, take the posterior mode (or a sample with `key`), decode."""
        dist = self.encode(sample)
        return self.decode(dist.mode() if key is None else dist.sample(key))


def latents_to_vae(latents: jax.Array, config: AutoencoderKLConfig) -> jax.Array:
    """Diffusion-space latents -> VAE-space, before `decode`: `latents / scaling_factor +
    shift_factor`, exactly as FluxPipeline does (shift None counts as 0)."""
    return latents / config.scaling_factor + (config.shift_factor or 0.0)


def vae_to_latents(z: jax.Array, config: AutoencoderKLConfig) -> jax.Array:
    """VAE-space latents (`encode(x).sample(key)`) -> diffusion-space: `(z - shift_factor) *
    scaling_factor`, the inverse of `latents_to_vae` (FluxImg2ImgPipeline, training scripts)."""
    return (z - (config.shift_factor or 0.0)) * config.scaling_factor
