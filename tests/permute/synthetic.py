"""Synthetic layers with per-channel scale structure, for permutation tests."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def outlier_layer(
    seed: int,
    *,
    tokens: int = 512,
    d_in: int = 256,
    d_out: int = 128,
    ratio: float = 30.0,
    frac: float = 0.05,
    w_pow: float = 0.6,
):
    """x (tokens, d_in) with a fraction `frac` of channels `ratio` times louder (shuffled), and
    weight rows scaled by scale^-w_pow (partial compensation, as smoothing-like training leaves
    them). Returns (x, w) float32 jax arrays and the per-channel scale."""
    rng = np.random.default_rng(seed)
    loud = rng.random(d_in) < frac
    scale = np.where(loud, ratio, 1.0) * np.exp(0.1 * rng.standard_normal(d_in))
    x = rng.standard_normal((tokens, d_in)) * scale
    w = rng.standard_normal((d_in, d_out)) * (scale**-w_pow)[:, None]
    return jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), scale
