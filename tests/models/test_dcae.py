"""Parity of the NNX DC-AE decoder with diffusers' AutoencoderDC.decode (float32).

Bound: max |ours - diffusers| <= 1e-4 of the output scale. Both compute the same float32
convolutions and sums in different orders (XLA vs ATen): a few ulp per op; through a handful of
blocks this stays orders of magnitude below 1e-4, while a wrong channel order in the attention
groups, pixel shuffle or shortcut moves the output by O(1) of its scale.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import convert  # noqa: E402
from pqjax.models import dcae  # noqa: E402
from pqjax.models.configs import ConfigError  # noqa: E402
from tests.parity import assert_close_rel, randomize_  # noqa: E402

BASE = dict(
    in_channels=3, latent_channels=4, attention_head_dim=4,
    encoder_block_types="ResBlock", encoder_block_out_channels=(8, 16, 16),
    encoder_layers_per_block=(1, 1, 1), encoder_qkv_multiscales=((), (), ()),
    decoder_block_out_channels=(8, 16, 16), decoder_layers_per_block=(1, 1, 2),
    decoder_block_types=("ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
    decoder_qkv_multiscales=((), (3,), (5,)), scaling_factor=0.41407,
)
CONFIGS = {
    # SANA's layout in small: interpolating up-blocks, ResBlocks then EfficientViT blocks.
    "interpolate": dict(upsample_block_type="interpolate"),
    # pixel-shuffle up-blocks, two scales in one block, mish, no input shortcut.
    "pixel_shuffle": dict(upsample_block_type="pixel_shuffle", decoder_act_fns="mish",
                          decoder_qkv_multiscales=((), (3, 5), ()), decoder_in_shortcut=False),
}


def tiny(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = diffusers.AutoencoderDC(**{**BASE, **CONFIGS[name]}).eval()
    randomize_(model, std=0.15, seed=seed)
    return model


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("size", [(3, 5), (1, 1)])  # odd latents; 1x1 takes the quadratic path
def test_decode_parity(name, size, tmp_path):
    tmodel = tiny(name)
    tmodel.save_pretrained(tmp_path)
    jmodel = convert.load_model(tmp_path)
    assert isinstance(jmodel, dcae.AutoencoderDC)
    z = np.random.default_rng(0).normal(size=(2, 4, *size)).astype(np.float32)
    with torch.no_grad():
        ref = tmodel.decode(torch.as_tensor(z)).sample.numpy()
    out = np.asarray(jmodel.decode(jnp.asarray(z)))
    assert out.shape == ref.shape == (2, 3, 4 * size[0], 4 * size[1])
    assert_close_rel(out, ref, 1e-4, f"{name} {size}")


def test_spatial_compression_and_errors():
    cfg = dcae.read_config({**BASE, "decoder_block_out_channels": [8, 16, 16]}, "vae.json")
    assert cfg.spatial_compression == 4 and cfg.decoder_block_out_channels == (8, 16, 16)
    assert dcae.AutoencoderDCConfig().spatial_compression == 32  # f32c32
    with pytest.raises(ConfigError, match="vae.json: unsupported AutoencoderDC config fields"):
        dcae.read_config({"decoder_depth": 3}, "vae.json")
    with pytest.raises(ConfigError, match="decoder_layers_per_block must have 3 entries"):
        dcae.read_config({**BASE, "decoder_layers_per_block": [1, 1]}, "vae.json")
    with pytest.raises(ConfigError, match="only decoder_norm_types 'rms_norm'"):
        dcae.read_config({**BASE, "decoder_norm_types": "batch_norm"}, "vae.json")
