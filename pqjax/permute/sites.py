"""Which sites a model has: its family record's (`pqjax.models.family`), or a builder
registered for a research model's class with `register_sites`.

    sites = permute.sites(model)      # FLUX, SANA, Z-Image (the embedded model is a FLUX)
"""

from __future__ import annotations

from collections.abc import Callable

from flax import nnx

from pqjax.models.family import families, family_of
from pqjax.models.sites import Edit, Segments, Site, linear_out, modulation, order_within

__all__ = ["Edit", "Segments", "Site", "linear_out", "modulation", "order_within",
           "register_sites", "sites"]

SiteBuilder = Callable[[nnx.Module], list[Site]]
_BUILDERS: dict[type, SiteBuilder] = {}


def register_sites(model_cls: type) -> Callable[[SiteBuilder], SiteBuilder]:
    """Decorator: `fn(model) -> list[Site]` declares the sites of `model_cls`."""

    def add(fn: SiteBuilder) -> SiteBuilder:
        _BUILDERS[model_cls] = fn
        return fn

    return add


def sites(model: nnx.Module) -> list[Site]:
    """The permutation sites of `model`: a builder registered for its class, else its family
    record's (FLUX, SANA, Z-Image)."""
    for cls in type(model).__mro__:
        if cls in _BUILDERS:
            return _BUILDERS[cls](model)
    fam = family_of(model)
    if fam is not None:
        return fam.sites(model)
    known = sorted({f.model_class.__name__ for f in families()} | {c.__name__ for c in _BUILDERS})
    raise TypeError(f"no permutation sites are declared for {type(model).__name__}; known: {known}")
