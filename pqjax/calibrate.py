"""Calibration: per-input-channel activation statistics of every Linear, jit-compiled.

    calib = calibrate(model, batches, n_rows=256, seed=0)   # batches: model keyword inputs
    calib["transformer_blocks.0.attn.to_q"].mean_sq          # (d_in,) mean of x^2 per channel

Each Linear gets an observer for the duration of the run. Per input channel it accumulates
the sum of x^2, the absmax and the row count in float32 (memory independent of the number of
samples), and it keeps a uniform random sample of `n_rows` activation rows without
replacement (bottom-k priority sampling: every row draws a uniform priority from a fixed-seed
stream, the k smallest survive), which the acceptance rule evaluates errors on.

Every observer draws from the same stream (the seed, then the call index), so Linears that
read the same tensor (q, k, v after one norm) keep the same rows: one row sample per input
tensor, and every method scores a layer on the same rows.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from pqjax.models.layers import Linear
from pqjax.state_jit import nnx_jit


class Stat(nnx.Variable):
    """Calibration state (not a parameter): never exported, never quantized."""


class NonFiniteCalibration(ValueError):
    """Calibration met NaN or Inf (or an overflowing x^2); the message names layer and batch.

    Raised for a NaN or Inf parameter (checked once, before any batch), a batch input holding
    NaN or Inf, or a layer input that is non-finite or so large that its sum of x^2 overflows
    float32: one such value would make act_global_scale NaN and every quantized output NaN.
    Each observer keeps a sticky status and the reading, at its first bad call, of a call
    counter all observers share, so the layer named is the first in execution order to see
    bad data; the host reads the flags once per batch.
    """


# ChannelObserver.status codes
FINITE, NONFINITE_INPUT, SUM_SQ_OVERFLOW = 0, 1, 2


class ChannelObserver(nnx.Module):
    """Accumulates statistics of the rows `x.reshape(-1, d_in)` it is called with.

    With `track_batches > 0` it also keeps the absmax of each of the first `track_batches`
    calls (one call per calibration batch, i.e. per timestep along a trajectory).
    """

    def __init__(self, d_in: int, n_rows: int, key: jax.Array, track_batches: int = 0):
        self.sum_sq = Stat(jnp.zeros((d_in,), jnp.float32))
        self.absmax = Stat(jnp.zeros((d_in,), jnp.float32))
        self.count = Stat(jnp.zeros((), jnp.float32))
        self.rows = Stat(jnp.zeros((n_rows, d_in), jnp.float32))
        self.priority = Stat(jnp.full((n_rows,), jnp.inf, jnp.float32))
        self.calls = Stat(jnp.zeros((), jnp.uint32))
        self.key = Stat(key)
        self.batch_absmax = Stat(jnp.zeros((track_batches, d_in), jnp.float32))
        self.status = Stat(jnp.zeros((), jnp.int32))  # FINITE until the first bad call
        self.bad_tick = Stat(jnp.full((), -1, jnp.int32))  # the shared clock at that call
        self.clock = nnx.data(None)  # a Stat shared by every observer: counts their calls

    def __call__(self, x: jax.Array) -> None:
        rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
        self.sum_sq[...] += jnp.sum(jnp.square(rows), axis=0)
        call_absmax = jnp.max(jnp.abs(rows), axis=0)
        self.absmax[...] = jnp.maximum(self.absmax[...], call_absmax)
        if self.batch_absmax.shape[0]:  # out-of-range writes past track_batches are dropped
            self.batch_absmax[...] = self.batch_absmax[...].at[self.calls[...]].set(
                call_absmax, mode="drop")
        self.count[...] += rows.shape[0]
        self._check(call_absmax)
        prio = jax.random.uniform(jax.random.fold_in(self.key[...], self.calls[...]), (len(rows),))
        self.calls[...] += 1
        all_prio = jnp.concatenate([self.priority[...], prio])
        keep = jax.lax.top_k(-all_prio, self.rows.shape[0])[1]
        self.rows[...] = jnp.concatenate([self.rows[...], rows])[keep]
        self.priority[...] = all_prio[keep]


    def _check(self, call_absmax: jax.Array) -> None:
        """Record the first call whose rows held NaN/Inf (max propagates them) or that made
        the running sum of x^2 overflow; two reductions of (d_in,) vectors."""
        status = jnp.where(
            ~jnp.isfinite(call_absmax).all(), NONFINITE_INPUT,
            jnp.where(~jnp.isfinite(self.sum_sq[...]).all(), SUM_SQ_OVERFLOW, FINITE),
        )
        tick = jnp.asarray(-1, jnp.int32)
        if self.clock is not None:
            tick = self.clock[...]
            self.clock[...] += 1
        first = (self.status[...] == FINITE) & (status != FINITE)
        self.bad_tick[...] = jnp.where(first, tick, self.bad_tick[...])
        self.status[...] = jnp.where(first, status, self.status[...])


@dataclasses.dataclass(frozen=True)
class LayerStats:
    """Statistics of one Linear's input. Arrays `(d_in,)`; `rows` `(n, d_in)` sampled rows."""

    mean_sq: jax.Array
    absmax: jax.Array
    count: int
    rows: jax.Array
    batch_absmax: jax.Array | None = None  # (n_batches, d_in) when calibrate(track_batches=n)


Calibration = dict[str, LayerStats]


def linears(model: nnx.Module) -> Iterator[tuple[str, Linear]]:
    """(dotted path, Linear) for every Linear in `model`, in module-tree order."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Linear):
            yield ".".join(str(p) for p in path), node


def calibrate(
    model: nnx.Module,
    batches: Iterable[dict[str, Any]],
    *,
    n_rows: int = 256,
    seed: int = 0,
    forward: Callable[..., Any] | None = None,
    select: Callable[[str], bool] | None = None,
    track_batches: int = 0,
    mesh: jax.sharding.Mesh | None = None,
    shard_weights: bool = False,
    progress: bool = True,
    collect: list[Any] | None = None,
    prefix: str = "",
) -> Calibration:
    """Run `forward(model, **batch)` (default `model(**batch)`) over `batches` and collect stats.

    Observers attach to every Linear that `select(path)` accepts and are removed afterwards,
    so `model` is unchanged. One compilation per distinct batch shape. track_batches: also
    keep each of the first n batches' per-channel absmax (per-timestep statistics).

    mesh: data-parallel calibration: every batch is split along its leading (batch) axis over
    the mesh's first axis (arrays named `*_ids` are position tables and stay replicated), and
    weights are replicated, or with `shard_weights` sharded FSDP-style along their largest
    divisible axis. The statistics equal a single device's up to float summation order.

    collect: a list that receives each batch's forward output (on the host), so that a caller
    running a model piece by piece gets the next piece's inputs from the same pass. prefix:
    the dotted path of `model` in a larger model, for the paths error messages name.
    """
    targets = [(p, m) for p, m in linears(model) if select is None or select(p)]
    if not targets:
        raise ValueError("calibrate: the model has no Linear layers to observe")
    key = jax.random.key(seed)  # one stream for all: readers of one tensor keep the same rows
    for _, lin in targets:
        lin.observer = ChannelObserver(lin.in_features, n_rows, key, track_batches)
    clock = Stat(jnp.zeros((), jnp.int32))
    for _, lin in targets:
        lin.observer.clock = clock
    fwd = forward or _call
    keep = collect is not None
    if mesh is None:
        step = functools.partial(_observed_step, fwd=fwd, keep=keep)
    else:  # after the observers and their clock: all state on the mesh
        _shard_model(model, mesh, shard_weights)
        placed = jax.tree.map(lambda x: x.sharding, nnx.state(model))
        batches = (_shard_batch(b, mesh) for b in batches)

        @nnx_jit
        def step(m: nnx.Module, batch: dict[str, Any]) -> tuple[Any, ...]:
            result = _observed(m, batch, fwd=fwd, keep=keep)
            # the state keeps its placement: the next batch reuses this program
            nnx.update(m, jax.tree.map(jax.lax.with_sharding_constraint, nnx.state(m), placed))
            return result

    try:
        _check_parameters(model, prefix)
        n = 0
        names = [f"{prefix}.{p}" if prefix else p for p, _ in targets]
        for batch in tqdm(batches, desc="calibrate", unit="batch", disable=not progress):
            *flags, output = jax.device_get(step(model, batch))
            _raise_if_bad(n, *flags, names)
            if collect is not None:
                collect.append(output)
            n += 1
        if n == 0:
            raise ValueError("calibrate: no calibration batches were given")
        out: Calibration = {}
        for path, lin in targets:
            obs = lin.observer
            count = int(obs.count[...])
            if count == 0:
                continue  # a Linear the forward never reached (e.g. unused guidance embedder)
            kept = min(count, obs.rows.shape[0])
            out[path] = LayerStats(
                mean_sq=obs.sum_sq[...] / count,
                absmax=obs.absmax[...],
                count=count,
                rows=obs.rows[...][:kept],
                batch_absmax=obs.batch_absmax[...][: min(n, track_batches)]
                if track_batches else None,
            )
        return out
    finally:
        for _, lin in targets:
            lin.observer = None


def _call(model: nnx.Module, **batch: Any) -> Any:
    """calibrate's default forward: the model called with the batch's keywords."""
    return model(**batch)


def _observed(m: nnx.Module, batch: dict[str, Any], *, fwd: Callable[..., Any],
              keep: bool) -> tuple[Any, ...]:
    """One observed forward: (inputs finite, observer status, their first bad tick, the
    forward's output if `keep`). Jitted once per (forward, batch shapes, model structure):
    a forward that is a stable function (not a new lambda per call) reuses the program."""
    inputs_ok = {k: _all_finite(v) for k, v in batch.items()}
    out = fwd(m, **batch)
    observers = [lin.observer for _, lin in linears(m) if lin.observer is not None]
    return (inputs_ok, jnp.stack([o.status[...] for o in observers]),
            jnp.stack([o.bad_tick[...] for o in observers]), out if keep else None)


_observed_step = nnx_jit(_observed, static_argnames=("fwd", "keep"))


def _is_float(x: Any) -> bool:
    return x is not None and jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _all_finite(value: Any) -> jax.Array:
    """Is every float array in `value` (an array, a tuple of arrays, None...) finite."""
    return jnp.array([jnp.isfinite(x).all() for x in jax.tree.leaves(value) if _is_float(x)],
                     bool).all()


@jax.jit
def _params_finite(leaves: list[jax.Array]) -> jax.Array:
    return jnp.stack([jnp.isfinite(x).all() for x in leaves])


def _check_parameters(model: nnx.Module, prefix: str = "") -> None:
    """Refuse a model whose float parameters hold NaN or Inf, naming the first one."""
    head = prefix + "." if prefix else ""
    flat = [(head + ".".join(str(k) for k in path), v.get_value())
            for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    flat = [(name, x) for name, x in flat if _is_float(x)]
    if not flat:
        return
    ok = np.asarray(_params_finite([x for _, x in flat]))
    if not ok.all():
        bad = [name for (name, _), good in zip(flat, ok, strict=True) if not good]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise NonFiniteCalibration(f"calibrate: parameter {bad[0]} holds NaN or Inf{more}; "
                                   "calibration needs a finite model")


def _raise_if_bad(n: int, inputs_ok: dict[str, Any], status: np.ndarray, ticks: np.ndarray,
                  paths: list[str]) -> None:
    """Stop at batch `n` if an input or an observed layer input was not finite."""
    bad_inputs = [k for k, ok in inputs_ok.items() if not ok]
    if bad_inputs:
        raise NonFiniteCalibration(
            f"calibrate: batch {n}: input {bad_inputs[0]!r} holds NaN or Inf; clean or drop "
            "that batch"
        )
    if not status.any():
        return
    bad = np.flatnonzero(status)
    first = bad[np.argmin(ticks[bad])]  # the first observer, in execution order, to see it
    what = ("holds NaN or Inf" if status[first] == NONFINITE_INPUT
            else "is so large that its sum of x^2 overflows float32")
    others = f"; {len(bad) - 1} later layers saw it too" if len(bad) > 1 else ""
    raise NonFiniteCalibration(
        f"calibrate: batch {n}: the input of {paths[first]} {what} (the first layer to see it, "
        f"in execution order{others}); a parameter upstream or the batch overflows"
    )


def _shard_batch(batch: dict[str, Any], mesh: jax.sharding.Mesh) -> dict[str, Any]:
    from jax.sharding import NamedSharding, PartitionSpec

    axis = mesh.axis_names[0]
    n = mesh.shape[axis]

    def put(name: str, x: Any) -> Any:
        x = jnp.asarray(x)
        split = x.ndim >= 1 and not name.endswith("_ids") and x.shape[0] % n == 0
        return jax.device_put(x, NamedSharding(mesh, PartitionSpec(axis if split else None)))

    return {k: (None if v is None else put(k, v)) for k, v in batch.items()}


def _shard_model(model: nnx.Module, mesh: jax.sharding.Mesh, shard_weights: bool) -> None:
    """Replicate the model's state over `mesh` (or shard weights FSDP-style), in place."""
    from jax.sharding import NamedSharding, PartitionSpec

    axis = mesh.axis_names[0]
    n = mesh.shape[axis]

    def spec(x: jax.Array) -> NamedSharding:
        # written as jit writes its outputs' shardings (no trailing None, an empty array
        # replicated), so that the step's outputs come back with the shardings it was given
        dims = [None] * x.ndim
        if shard_weights and x.ndim >= 2 and x.size:
            big = max(range(x.ndim), key=lambda i: x.shape[i] if x.shape[i] % n == 0 else -1)
            if x.shape[big] % n == 0:
                dims[big] = axis
        while dims and dims[-1] is None:
            dims.pop()
        return NamedSharding(mesh, PartitionSpec(*dims))

    state = nnx.state(model)
    nnx.update(model, jax.tree.map(lambda x: jax.device_put(x, spec(x)), state))
