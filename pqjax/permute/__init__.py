"""PermuQuant's channel permutations: criteria, search with the acceptance rule, sites, absorb.

res = permute.search(x, w, weights="nvfp4", acts="nvfp4")   # one layer (or one site)
sites = permute.sites(model)                                 # the model's sites
model2 = permute.absorb(model, {s.name: s.random(key) for s in sites})

@permute.register_criterion("my_score")                      # research hook
def my_score(stats, alpha): ...                              # -> score per input channel
"""

from pqjax.models.paths import module_at
from pqjax.permute.absorb import absorb
from pqjax.permute.criteria import (
    ChannelStats,
    criterion_names,
    get_criterion,
    register_criterion,
)
from pqjax.permute.search import SearchResult, layer_errors, order_from_scores, search
from pqjax.permute.sites import Edit, Site, register_sites, sites

__all__ = [
    "ChannelStats",
    "Edit",
    "SearchResult",
    "Site",
    "absorb",
    "criterion_names",
    "get_criterion",
    "layer_errors",
    "module_at",
    "order_from_scores",
    "register_criterion",
    "register_sites",
    "search",
    "sites",
]
