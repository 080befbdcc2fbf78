"""diffusers' `AutoencoderDC` (DC-AE, SANA's 32x autoencoder) decoder in Flax NNX.

SANA-1.5 decodes its 32-channel latents with DC-AE f32c32: each latent pixel becomes a
32 x 32 image patch. Only the decoder is built (sampling never encodes); the checkpoint's
`encoder.*` tensors are skipped by the key map. Module names mirror diffusers'
(`decoder.up_blocks.3.1.attn.to_q`, ...); activations are channels-last inside, and `decode`
takes and returns NCHW like diffusers:

    vae = convert.load_model("Sana_1600M_1024px_diffusers/vae")        # AutoencoderDC
    image = vae.decode(latents / vae.config.scaling_factor)  # (b, 32, h, w) -> (b, 3, 32h, 32w)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pqjax.models.configs import ConfigError
from pqjax.models.conv import Conv2d
from pqjax.models.dcae_blocks import (
    ACTIVATIONS,
    ChannelRMSNorm,
    DCUpBlock2d,
    EfficientViTBlock,
    ResBlock,
)

BLOCK_TYPES = ("ResBlock", "EfficientViTBlock")


@dataclasses.dataclass(frozen=True)
class AutoencoderDCConfig:
    """diffusers' `AutoencoderDC` config; defaults are diffusers'. The encoder fields are kept
    so configs round-trip; they do not shape the decoder."""

    in_channels: int = 3
    latent_channels: int = 32
    attention_head_dim: int = 32
    encoder_block_types: str | tuple[str, ...] = "ResBlock"
    decoder_block_types: str | tuple[str, ...] = "ResBlock"
    encoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    decoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    encoder_layers_per_block: tuple[int, ...] = (2, 2, 2, 3, 3, 3)
    decoder_layers_per_block: tuple[int, ...] = (3, 3, 3, 3, 3, 3)
    encoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))
    decoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))
    upsample_block_type: str = "pixel_shuffle"
    downsample_block_type: str = "pixel_unshuffle"
    decoder_norm_types: str | tuple[str, ...] = "rms_norm"
    decoder_act_fns: str | tuple[str, ...] = "silu"
    encoder_out_shortcut: bool = True
    decoder_in_shortcut: bool = True
    decoder_conv_act_fn: str = "relu"
    scaling_factor: float = 1.0

    def per_block(self, value: Any) -> tuple[Any, ...]:
        n = len(self.decoder_block_out_channels)
        return (value,) * n if isinstance(value, str) else tuple(value)

    def __post_init__(self):
        n = len(self.decoder_block_out_channels)
        src = "AutoencoderDCConfig"
        for name in ("decoder_block_types", "decoder_norm_types", "decoder_act_fns",
                     "decoder_layers_per_block", "decoder_qkv_multiscales"):
            if len(self.per_block(getattr(self, name))) != n:
                raise ConfigError(f"{src}: {name} must have {n} entries (one per block)")
        bad = set(self.per_block(self.decoder_block_types)) - set(BLOCK_TYPES)
        if bad:
            raise ConfigError(f"{src}: decoder_block_types {sorted(bad)} not in {BLOCK_TYPES}")
        if set(self.per_block(self.decoder_norm_types)) != {"rms_norm"}:
            raise ConfigError(f"{src}: only decoder_norm_types 'rms_norm' is supported "
                              f"(SANA's DC-AE), got {self.decoder_norm_types!r}")
        acts = {*self.per_block(self.decoder_act_fns), self.decoder_conv_act_fn}
        if not acts <= set(ACTIVATIONS):
            raise ConfigError(f"{src}: activations {sorted(acts - set(ACTIVATIONS))} not in "
                              f"{sorted(ACTIVATIONS)}")
        if self.upsample_block_type not in ("pixel_shuffle", "interpolate"):
            raise ConfigError(f"{src}: upsample_block_type {self.upsample_block_type!r} is not "
                              "'pixel_shuffle' or 'interpolate'")
        if self.decoder_layers_per_block[0] == 0:
            raise ConfigError(f"{src}: decoder_layers_per_block[0] = 0 (a final up-block "
                              "instead of conv_out) is not supported")

    @property
    def spatial_compression(self) -> int:
        """Image pixels per latent pixel along each side: 2^(blocks - 1) (32 for f32c32)."""
        return 2 ** (len(self.decoder_block_out_channels) - 1)


def _tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def read_config(raw: dict[str, Any], source: str) -> AutoencoderDCConfig:
    """Parse a diffusers AutoencoderDC config.json; unknown fields are errors."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a config must be a JSON object, got {type(raw).__name__}")
    names = {f.name for f in dataclasses.fields(AutoencoderDCConfig)}
    unknown = sorted(k for k in raw if not k.startswith("_") and k not in names)
    if unknown:
        raise ConfigError(f"{source}: unsupported AutoencoderDC config fields {unknown}")
    try:
        return AutoencoderDCConfig(**{k: _tuples(v) for k, v in raw.items() if k in names})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {e}") from e


def write_config(config: AutoencoderDCConfig) -> dict[str, Any]:
    return {"_class_name": "AutoencoderDC", **dataclasses.asdict(config)}


# SANA's DC-AE f32c32 (`vae/` of the SANA-1.5 pipelines; as diffusers'
# scripts/convert_dcae_to_diffusers.py builds dc-ae-f32c32-sana-1.0).
SANA_DCAE = AutoencoderDCConfig(
    latent_channels=32, attention_head_dim=32,
    encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    encoder_layers_per_block=(2, 2, 2, 3, 3, 3), decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
    downsample_block_type="conv", upsample_block_type="interpolate",
    decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407,
)


class DCAEDecoder(nnx.Module):
    """latents `(b, h, w, latent_channels)` -> image `(b, 32h, 32w, in_channels)`, NHWC."""

    def __init__(self, config: AutoencoderDCConfig, *, dtype: Any, rngs: nnx.Rngs):
        chans = config.decoder_block_out_channels
        kinds = config.per_block(config.decoder_block_types)
        acts = config.per_block(config.decoder_act_fns)
        n = len(chans)
        self.conv_act = config.decoder_conv_act_fn
        self.in_repeats = chans[-1] // config.latent_channels if config.decoder_in_shortcut else 0
        self.conv_in = Conv2d(config.latent_channels, chans[-1], 3, padding=1, dtype=dtype,
                              rngs=rngs)
        blocks = []
        for i, (c, layers) in enumerate(zip(chans, config.decoder_layers_per_block)):
            seq: list[nnx.Module] = []
            if i < n - 1 and layers > 0:
                seq.append(DCUpBlock2d(chans[i + 1], c,
                                       interpolate=config.upsample_block_type == "interpolate",
                                       shortcut=True, dtype=dtype, rngs=rngs))
            for _ in range(layers):
                if kinds[i] == "ResBlock":
                    seq.append(ResBlock(c, acts[i], dtype=dtype, rngs=rngs))
                else:
                    seq.append(EfficientViTBlock(c, config.attention_head_dim,
                                                 tuple(config.decoder_qkv_multiscales[i]),
                                                 dtype=dtype, rngs=rngs))
            blocks.append(nnx.List(seq))
        self.up_blocks = nnx.List(blocks)
        self.norm_out = ChannelRMSNorm(chans[0], dtype=dtype)
        self.conv_out = Conv2d(chans[0], config.in_channels, 3, padding=1, dtype=dtype,
                               rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        h = self.conv_in(z)
        if self.in_repeats:
            h = h + jnp.repeat(z, self.in_repeats, axis=-1).astype(h.dtype)
        for seq in reversed(self.up_blocks):  # deepest (smallest) resolution first
            for block in seq:
                h = block(h)
        return self.conv_out(ACTIVATIONS[self.conv_act](self.norm_out(h)))


class AutoencoderDC(nnx.Module):
    """diffusers' `AutoencoderDC`, decoder only. Parameters in `dtype`; norms in float32."""

    def __init__(self, config: AutoencoderDCConfig, *, dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        self.config = config
        self.decoder = DCAEDecoder(config, dtype=dtype, rngs=rngs)

    def decode(self, z: jax.Array) -> jax.Array:
        """diffusers' `AutoencoderDC.decode(z).sample`: NCHW `(b, latent_channels, h, w)` ->
        `(b, in_channels, s h, s w)`, s = `config.spatial_compression` (no tiling)."""
        if z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"latents must be (batch, {self.config.latent_channels}, h, w), "
                             f"got shape {z.shape}")
        return jnp.transpose(self.decoder(jnp.transpose(z, (0, 2, 3, 1))), (0, 3, 1, 2))
