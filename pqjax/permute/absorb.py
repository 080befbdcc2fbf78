"""Absorb channel permutations into a model's parameters: same function, permuted weights.

    model2 = permute.absorb(model, {site.name: perm, ...})

For each site: consumer kernels' input rows, the producing layers' output columns and
modulation chunks, and the norms' affine weights are permuted; norms read their input through
the permutation (`norm.perm`: a gather in XLA, the fused kernel on GPU), so the residual
stream keeps its order and nothing else is permuted at run time. The input model is unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from pqjax.models.layers import Linear, Permutation
from pqjax.models.paths import module_at
from pqjax.permute.sites import Edit, Site, sites


def _permute_variable(
    var: nnx.Variable, perm: np.ndarray, axis: int, offset: int, index: int | None
) -> None:
    value = var.get_value()
    target = value if index is None else value[index]
    idx = np.arange(target.shape[axis])
    idx[offset : offset + len(perm)] = offset + perm
    permuted = jnp.take(target, jnp.asarray(idx), axis=axis)
    var.set_value(permuted if index is None else value.at[index].set(permuted))


def _apply_edit(model: nnx.Module, edit: Edit, perm: np.ndarray, site: Site) -> None:
    start, stop = edit.channels or (0, site.dim)
    sub = perm[start:stop] - start
    if sorted(sub.tolist()) != list(range(stop - start)):
        raise ValueError(
            f"site {site.name}: the order mixes channels across the range {start}:{stop} that "
            f"{edit.param} produces; constrain it with the site's segments"
        )
    var = module_at(model, edit.param)
    if not isinstance(var, nnx.Variable):
        raise TypeError(f"site {site.name}: {edit.param} is not a parameter")
    _permute_variable(var, sub, edit.axis, edit.offset, edit.index)


def _absorb_site(model: nnx.Module, site: Site, perm: np.ndarray) -> None:
    for path in site.consumers:
        layer = module_at(model, path)
        if not isinstance(layer, Linear):
            raise TypeError(
                f"site {site.name}: consumer {path} is a {type(layer).__name__}, not a "
                "full-precision Linear; absorb permutations before quantizing"
            )
        _permute_variable(layer.kernel, perm, axis=0, offset=0, index=None)
    for edit in site.edits:
        _apply_edit(model, edit, perm, site)
    for path in site.norms:
        norm = module_at(model, path)
        old = None if norm.perm is None else np.asarray(norm.perm.get_value())
        norm.perm = Permutation(jnp.asarray(perm if old is None else old[perm], jnp.int32))
        for name in ("scale", "bias"):
            if getattr(norm, name, None) is not None:
                _permute_variable(getattr(norm, name), perm, axis=0, offset=0, index=None)


def absorb(
    model: nnx.Module,
    perms: Mapping[str, Any],
    *,
    site_list: list[Site] | None = None,
) -> nnx.Module:
    """A copy of `model` with each site's permutation absorbed; identity orders are skipped.

    perms: site name -> `(dim,)` gather order (new channel j reads old channel perm[j]).
    """
    by_name = {s.name: s for s in (site_list if site_list is not None else sites(model))}
    unknown = sorted(set(perms) - set(by_name))
    if unknown:
        raise KeyError(
            f"unknown sites {unknown[:5]}; the model has {len(by_name)} sites, "
            f"e.g. {sorted(by_name)[:5]}"
        )
    out = nnx.clone(model)
    for name, perm in perms.items():
        site = by_name[name]
        perm = np.asarray(perm, dtype=np.int32)
        if not site.is_valid(perm):
            raise ValueError(
                f"site {name}: not a valid permutation of {site.dim} channels under segments "
                f"{site.segments}"
            )
        if np.array_equal(perm, site.identity()):
            continue
        _absorb_site(out, site, perm)
    return out
