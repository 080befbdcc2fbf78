"""One site mechanism for every model: absorb random valid orders at every site, same output."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pqjax import permute
from pqjax.models.zimage import ZImageConfig, ZImageTransformer2DModel
from tests.models.test_zimage import CONFIGS as ZCONFIGS
from tests.parity import assert_close_rel, random_nnx


def random_orders(sites, seed):
    return {s.name: s.random(jax.random.key(seed + i)) for i, s in enumerate(sites)}


def zimage_inputs(config: ZImageConfig, seed: int = 0):
    rng = np.random.default_rng(seed)
    latents = jnp.asarray(rng.standard_normal((2, config.in_channels, 1, 8, 6)), jnp.float32)
    caps = jnp.asarray(rng.standard_normal((2, 40, config.cap_feat_dim)), jnp.float32)
    return latents, jnp.asarray([0.3, 0.8], jnp.float32), caps, jnp.asarray([40, 17])


@pytest.mark.parametrize("name", sorted(ZCONFIGS))
def test_zimage_absorb_is_exact(name):
    cfg = ZCONFIGS[name]
    config = ZImageConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})
    model = random_nnx(ZImageTransformer2DModel, config, 0.07)
    sites = permute.sites(model)
    blocks = 2 * config.n_refiner_layers + config.n_layers
    assert len(sites) == 4 * blocks + 1
    kinds = {s.kind for s in sites}
    assert kinds == {"norm", "attn_out", "ffn_hidden", "free"}
    permuted = permute.absorb(model, random_orders(sites, 0))
    inputs = zimage_inputs(config)
    ref = np.asarray(model.forward_batch(*inputs))
    assert_close_rel(np.asarray(permuted.forward_batch(*inputs)), ref, 1e-5, f"Z-Image {name}")
    # the context refiner has no AdaLN: its norm sites carry no modulation edits
    ctx = next(s for s in sites if s.name == "context_refiner.0.attention_norm1")
    assert ctx.edits == ()
    swiglu = next(s for s in sites if s.name == "layers.0.feed_forward.hidden")
    assert [e.role for e in swiglu.edits] == ["perm_only", "linear"]
