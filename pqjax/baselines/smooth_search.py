"""Searches on smoothed inputs: SmoothQuant's per-channel migration scale at a site, then
`permute.search` on what the consumers compute once it is folded (permuquant_hs).

    s, res = smoothed_search(rows, [kernel], 0.5, act_absmax=rows_absmax, weights="nvfp4",
                             acts="nvfp4", rotate=(None, "hadamard:16"))

x / s and diag(s) W give the same product as x and W in full precision; the quantizers see
channels whose ranges migrated between activations and weights. The scale keeps the
activation range (`smoothing.keep_act_range`), so the static NVFP4 global scale stays valid.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pqjax import permute
from pqjax.baselines.smoothing import keep_act_range, migration_scales


def smoothed(rows: Any, kernel: Any, scale: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """(x / s, diag(s) W in W's dtype, as `smoothing.absorb_scales` stores it): what a
    consumer computes once the scale s `(d_in,)` is folded. rows `(n, d_in)`, kernel
    `(d_in, d_out)`."""
    s, k = jnp.asarray(scale, jnp.float32), jnp.asarray(kernel)
    return (jnp.asarray(rows, jnp.float32) / s,
            (s[:, None] * k.astype(jnp.float32)).astype(k.dtype))


def site_scale(act_absmax: Any, kernels: list[Any], strength: float) -> np.ndarray:
    """SmoothQuant's migration scale `(dim,)` (its alpha: `strength`) from the site's calibrated
    absmax `(dim,)` and the consumers' kernel rows, rescaled so the activation range (the
    static NVFP4 global scale) is unchanged."""
    w_absmax = np.max([np.max(np.abs(np.asarray(k, np.float32)), axis=1) for k in kernels], 0)
    return keep_act_range(migration_scales(act_absmax, w_absmax, strength), act_absmax)


def smoothed_search(
    rows: Any, kernels: list[Any], strength: float | None, *, act_absmax: Any,
    act_mean_sq: Any = None, **search_kw: Any,
) -> tuple[np.ndarray | None, permute.SearchResult]:
    """`permute.search` on rows `(n, dim)` and kernels `(dim, d_out)` smoothed by the site
    scale of `strength` (SmoothQuant's alpha; None: as they are). search_kw: `permute.search`'s
    (its own `alpha` is the sorting criterion's). Returns (the scale or None, the result)."""
    if strength is None:
        return None, permute.search(rows, kernels, act_absmax=act_absmax,
                                    act_mean_sq=act_mean_sq, **search_kw)
    s = site_scale(act_absmax, kernels, strength)
    pairs = [smoothed(rows, k, s) for k in kernels]
    mean_sq = None if act_mean_sq is None else np.asarray(act_mean_sq) / np.square(s)
    return s, permute.search(pairs[0][0], [k for _, k in pairs], act_mean_sq=mean_sq,
                             act_absmax=np.asarray(act_absmax) / s, **search_kw)


def best_smoothed(
    rows: Any, kernel: Any, strengths: tuple[float, ...], *, act_absmax: Any, **search_kw: Any
) -> tuple[float, float, float | None, np.ndarray | None, permute.SearchResult]:
    """One layer's choice among no scale and the scale of each strength, each with its own
    search (search_kw: `permute.search`'s; its candidates must start with no change, so the
    first search's err_identity is RTN's): the lowest calibration error at or below RTN's.
    Returns (error, RTN's error, strength or None, scale `(d_in,)` or None, the result)."""
    best, rtn = None, np.inf
    for strength in (None, *strengths):
        s, res = smoothed_search(rows, [kernel], strength, act_absmax=act_absmax, **search_kw)
        err = res.err_permuted if res.accepted else res.err_identity
        if strength is None:
            rtn = res.err_identity  # no scale, identity order, no rotation
        if err <= rtn and (best is None or err < best[0]):
            best = (err, strength, s, res)
    err, strength, s, res = best
    return err, rtn, strength, s, res
