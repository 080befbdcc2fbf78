"""Sorting criteria: a score per input channel; channels are ordered by a stable sort of it.

    @permute.register_criterion("my_score")
    def my_score(stats: ChannelStats, alpha: float) -> jax.Array:
        return stats.act_absmax * jnp.sqrt(stats.w_mean_sq)      # (d_in,)

A criterion is a pure jnp function `(stats, alpha) -> scores (d_in,)`. Channels with close
scores land next to each other, hence in the same quantization group. Criteria that need the
group layout or randomness read `stats.group_size` / `stats.key`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

_EPS = 1e-30


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ChannelStats:
    """Per-input-channel statistics of one layer (or one site: all consumers of an input).

    act_mean_sq, act_absmax: `(d_in,)` from calibration. w_mean_sq: `(d_in,)` mean over output
    channels of W[i, o]^2; w_absmax: `(d_in,)` max |W[i, o]|; w_row_sq: `(d_in,)` ||W_i||^2
    (sums over every consumer's output channels). group_size: the quantization group (static).
    key: PRNG key for stochastic criteria.
    """

    act_mean_sq: jax.Array
    act_absmax: jax.Array
    w_mean_sq: jax.Array
    w_absmax: jax.Array
    w_row_sq: jax.Array
    key: jax.Array
    group_size: int = dataclasses.field(default=16, metadata={"static": True})

    @property
    def dim(self) -> int:
        return self.act_mean_sq.shape[0]


Criterion = Callable[[ChannelStats, float], jax.Array]
_CRITERIA: dict[str, Criterion] = {}


def register_criterion(name: str) -> Callable[[Criterion], Criterion]:
    """Decorator adding a sorting criterion under `name` (an existing name is an error)."""

    def add(fn: Criterion) -> Criterion:
        if name in _CRITERIA and _CRITERIA[name] is not fn:
            raise ValueError(f"criterion {name!r} is already registered")
        _CRITERIA[name] = fn
        return fn

    return add


def get_criterion(name: str) -> Criterion:
    if name not in _CRITERIA:
        raise ValueError(f"unknown criterion {name!r}; registered: {sorted(_CRITERIA)}")
    return _CRITERIA[name]


def criterion_names() -> list[str]:
    return sorted(_CRITERIA)


def _log(x: jax.Array) -> jax.Array:
    return jnp.log(jnp.maximum(x, _EPS))


@register_criterion("joint_second_moment")
def joint_second_moment(stats: ChannelStats, alpha: float) -> jax.Array:
    """PermuQuant: mu_a^alpha * mu_w^(1-alpha), as a log (same order, no overflow)."""
    return alpha * _log(stats.act_mean_sq) + (1 - alpha) * _log(stats.w_mean_sq)


@register_criterion("activation")
def activation_only(stats: ChannelStats, alpha: float) -> jax.Array:
    return stats.act_mean_sq


@register_criterion("weight")
def weight_only(stats: ChannelStats, alpha: float) -> jax.Array:
    return stats.w_mean_sq


@register_criterion("absmax_product")
def absmax_product(stats: ChannelStats, alpha: float) -> jax.Array:
    """max|x_i|^alpha * max|W_i|^(1-alpha): what sets the per-group scales."""
    return alpha * _log(stats.act_absmax) + (1 - alpha) * _log(stats.w_absmax)


@register_criterion("hessian_diag")
def hessian_diagonal(stats: ChannelStats, alpha: float) -> jax.Array:
    """mu_a * ||W_i||^2: the diagonal of the layer Hessian times the weight row energy."""
    return _log(stats.act_mean_sq) + _log(stats.w_row_sq)


@register_criterion("zigzag")
def zigzag(stats: ChannelStats, alpha: float) -> jax.Array:
    """Round-robin: deal the joint-sorted channels across groups, one per group in turn.

    Each group then spans the whole range of scores: the opposite of sorting, a baseline for
    how much grouping similar channels matters.
    """
    d, g = stats.dim, stats.group_size
    n_groups = max(-(-d // g), 1)
    rank = jnp.argsort(jnp.argsort(joint_second_moment(stats, alpha), stable=True), stable=True)
    slot = (rank % n_groups) * g + rank // n_groups
    return slot.astype(jnp.float32)


@register_criterion("random")
def random_order(stats: ChannelStats, alpha: float) -> jax.Array:
    return jax.random.uniform(stats.key, (stats.dim,))


@register_criterion("identity")
def identity(stats: ChannelStats, alpha: float) -> jax.Array:
    return jnp.arange(stats.dim, dtype=jnp.float32)
