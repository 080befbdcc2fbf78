"""The engine tests' tiny models: one or two blocks per list, widths a few groups wide, and
numpy-made calibration batches (diffusers' forward keywords; Z-Image's `forward_batch`). The
FLUX is `tests/parity.py`'s, SANA and Z-Image are `tests/test_quantize_models.py`'s."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from tests.parity import TINY_FLUX
from tests.test_quantize_models import SANA, ZIMAGE, sana_batch, zimage_batch

__all__ = ["FLUX", "SANA", "ZIMAGE", "flux_batch", "forward", "sana_batch", "zimage_batch"]

FLUX = TINY_FLUX  # one double and one single block, inner dim 64


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


def forward(name: str, model: Any, batch: dict[str, Any]) -> np.ndarray:
    """The model's own forward on one of the batches above (Z-Image: `forward_batch`)."""
    call = model.forward_batch if name == "zimage" else model
    return np.asarray(call(**batch))
