"""The engine tests' tiny models: one or two blocks per list, widths a few groups wide, and
numpy-made calibration batches (diffusers' forward keywords; Z-Image's `forward_batch`)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from pqjax.models.sana import SanaConfig
from pqjax.models.zimage import ZImageConfig

FLUX = dict(num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=2,
            joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
            axes_dims_rope=(8, 12, 12), in_channels=8)
SANA = SanaConfig(
    in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=32, num_layers=2,
    num_cross_attention_heads=2, cross_attention_head_dim=32, cross_attention_dim=64,
    caption_channels=32, mlp_ratio=2.5, sample_size=8, qk_norm="rms_norm_across_heads",
)  # Mix-FFN hidden 160 = 10 groups of 16
ZIMAGE = ZImageConfig(
    dim=64, n_heads=2, n_kv_heads=2, n_layers=1, n_refiner_layers=1, cap_feat_dim=32,
    axes_dims=(8, 12, 12), axes_lens=(64, 32, 32), in_channels=4,
)


def flux_batch(seed: int) -> dict[str, Any]:
    """2 images of 4x4 packed latents, 6 text tokens."""
    rng = np.random.default_rng(seed)
    rows, cols = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
    img_ids = np.stack([np.zeros(16), rows.ravel(), cols.ravel()], -1)
    return {
        "hidden_states": jnp.asarray(rng.standard_normal((2, 16, 8)), jnp.float32),
        "encoder_hidden_states": jnp.asarray(rng.standard_normal((2, 6, 32)), jnp.float32),
        "pooled_projections": jnp.asarray(rng.standard_normal((2, 16)), jnp.float32),
        "timestep": jnp.asarray(rng.uniform(0.05, 0.95, 2), jnp.float32),
        "img_ids": jnp.asarray(img_ids, jnp.float32),
        "txt_ids": jnp.zeros((6, 3), jnp.float32),
        "guidance": jnp.full((2,), 3.5, jnp.float32),
    }


def sana_batch(seed: int) -> dict[str, Any]:
    """latents `(2, 8, 8, 8)` (64 tokens), an 8-token caption (the second one padded)."""
    rng = np.random.default_rng(seed)
    return {
        "hidden_states": jnp.asarray(rng.standard_normal((2, 8, 8, 8)), jnp.float32),
        "encoder_hidden_states": jnp.asarray(rng.standard_normal((2, 8, 32)), jnp.float32),
        "encoder_attention_mask": jnp.asarray(np.arange(8)[None] < [[8], [5]], jnp.int32),
        "timestep": jnp.asarray(rng.uniform(50.0, 950.0, 2), jnp.float32),
    }


def zimage_batch(seed: int) -> dict[str, Any]:
    """latents `(2, 4, 1, 8, 8)` (16 tokens), 32 caption rows with lengths 32 and 20."""
    rng = np.random.default_rng(seed)
    return {
        "latents": jnp.asarray(rng.standard_normal((2, 4, 1, 8, 8)), jnp.float32),
        "timestep": jnp.asarray(rng.uniform(0.05, 0.95, 2), jnp.float32),
        "cap_feats": jnp.asarray(rng.standard_normal((2, 32, 32)), jnp.float32),
        "cap_lens": jnp.asarray([32, 20], jnp.int32),
    }
