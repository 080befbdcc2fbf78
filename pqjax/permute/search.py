"""Permutation search with PermuQuant's acceptance rule, as jit-compiled array programs.

    res = search(x, w, weights="nvfp4", acts="nvfp4", criterion="joint_second_moment",
                 alpha=0.5, tau=0.0)
    res.perm, res.accepted, res.err_identity, res.err_permuted

x: `(tokens, d_in)` calibration activations; w: `(d_in, d_out)` Flax kernel, or a sequence of
kernels that all read x (the consumers of one permutation site). Groups run along d_in for
both. err = ||x W - Q(x) Q(W)||^2 / ||x W||^2 summed over consumers (each weight quantized on
its own). The order is accepted only if (E_identity - E_permuted) / E_identity > tau and no
consumer's own error grows, so every layer is at least as good as RTN on the calibration rows.

Rotations (`rotate=`, default None: no rotation): online input transforms of `pqjax.rotate`
(e.g. "hadamard:16") applied AFTER the permutation, the weight holding the inverse: errors
become ||x W - Q(x P T) Q(T^T P^T W)||^2 / ||x W||^2.
- a name: that rotation in every evaluation; identity and permuted orders are compared with
  the rotation applied in both (the reference is the rotated identity order);
- a sequence such as (None, "hadamard:16", "regular_hadamard:64"): the joint choice. Every
  (rotation, order) pair is scored, the identity order included, so the candidates are "no
  change", "order alone", "rotation alone" and "order + rotation". The reference is the first
  entry with the identity order (with None first: plain RTN), and the acceptance rule applies
  to the pair: the best pair whose every consumer is no worse than under the reference, kept
  if its gain exceeds tau. `SearchResult.rotate` holds the chosen rotation (None: none kept).
`pqjax.rotate.candidates(group, d)` lists the legal rotations of a d-channel site.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pqjax import formats
from pqjax import rotate as rot
from pqjax.models.sites import Segments
from pqjax.permute.criteria import ChannelStats, get_criterion
from pqjax.permute.refine import refine_order

_HIGHEST = jax.lax.Precision.HIGHEST
# Above this many consumers, a site's errors are computed one consumer after another.
SEQUENTIAL_FROM = 8


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """perm: `(d_in,)` int32 gather order (identity if not accepted); errors are floats."""

    perm: np.ndarray
    accepted: bool
    err_identity: float
    err_permuted: float
    criterion: str
    alpha: float
    candidate_perm: np.ndarray  # the best order found, whether accepted or not
    layer_err_identity: tuple[float, ...] = ()  # per kernel, the reference
    layer_err_permuted: tuple[float, ...] = ()  # per kernel, the best candidate pair
    rotate: str | None = None  # the kept rotation (the reference's when not accepted)
    candidate_rotate: str | None = None  # the best pair's rotation, accepted or not
    # every scored pair: (rotation, criterion, alpha, summed error, qualified)
    table: tuple[tuple[str | None, str, float, float, bool], ...] = ()  # reference first

    @property
    def gain(self) -> float:
        """Relative error reduction (E_id - E_perm) / E_id of the best candidate."""
        return (self.err_identity - self.err_permuted) / max(self.err_identity, 1e-30)


def as_format(fmt: str | formats.Format | None) -> formats.Format | None:
    return formats.get(fmt) if isinstance(fmt, str) else fmt


def stable_scores(scores: jax.Array) -> jax.Array:
    """Round scores to 12 mantissa bits so that near-ties from summation order become exact ties.

    Reductions sum in different orders on different backends; the last bits of a score are
    noise, and sorting on them would make the order backend-dependent.
    """
    s = jnp.nan_to_num(scores.astype(jnp.float32), nan=0.0, posinf=3e38, neginf=-3e38)
    bits = jax.lax.bitcast_convert_type(s, jnp.uint32)
    rounded = (bits + jnp.uint32(1 << 10)) & jnp.uint32(~((1 << 11) - 1) & 0xFFFFFFFF)
    return jax.lax.bitcast_convert_type(rounded, jnp.float32)


def order_from_scores(scores: jax.Array, segments: Segments) -> jax.Array:
    """Stable ascending sort of `scores (d,)` within each block of each segment -> perm `(d,)`."""
    s = stable_scores(scores)
    parts, offset = [], 0
    for size, block in segments:
        seg = s[offset : offset + size].reshape(size // block, block)
        local = jnp.argsort(seg, axis=-1, stable=True)
        base = offset + block * jnp.arange(size // block)[:, None]
        parts.append((local + base).reshape(-1))
        offset += size
    return jnp.concatenate(parts).astype(jnp.int32)


def check_segments(segments: Segments | None, d_in: int) -> Segments:
    segments = ((d_in, d_in),) if segments is None else tuple(segments)
    if sum(size for size, _ in segments) != d_in or any(size % b for size, b in segments):
        raise ValueError(f"segments {segments} do not tile d_in={d_in} into whole blocks")
    return segments


def quant_error(
    x: jax.Array,
    ws: Sequence[jax.Array],
    perm: jax.Array,
    wfmt: formats.Format | None,
    afmt: formats.Format | None,
    rotate: str | tuple[dict[str, jax.Array], int] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Per kernel `(n_kernels,)`: ||y - y_q||^2 and ||y||^2, inputs read in `perm` order and,
    with `rotate`, quantized after the input transform (weights after its fold). rotate: a
    transform name, or (row, max_block) of `rotate.transform_table` (the row may be traced)."""
    transform = _transform(rotate)
    xp = x[:, perm]
    xr = xp if transform is None else transform(xp)
    xq = xr if afmt is None else afmt.fake_quant(xr, dtype=jnp.float32)

    def one(w: jax.Array) -> tuple[jax.Array, jax.Array]:
        wp = w[perm].astype(jnp.float32)
        wr = wp if transform is None else transform(wp.T).T  # T^T W: each output's row times T
        wq = wr if wfmt is None else wfmt.fake_quant(wr.T, dtype=jnp.float32).T
        y = jnp.dot(xp, wp, precision=_HIGHEST)
        yq = jnp.dot(xq, wq, precision=_HIGHEST)
        return jnp.sum(jnp.square(y - yq)), jnp.sum(jnp.square(y))

    if len(ws) <= SEQUENTIAL_FROM:
        nums, dens = zip(*[one(w) for w in ws], strict=True)
        return jnp.stack(nums), jnp.stack(dens)

    # Many consumers (FLUX's temb site: 77 kernels, 3.2 B weights): one kernel per step of a
    # loop, so one kernel's float32 copies are live at a time. Written straight, XLA's CPU
    # scheduler started every kernel's work at once: 8 bytes of temporaries per weight.
    def body(i: jax.Array, acc: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        num, den = jax.lax.switch(i, [functools.partial(one, w) for w in ws])
        return acc[0].at[i].set(num), acc[1].at[i].set(den)

    zeros = jnp.zeros((len(ws),), jnp.float32)
    return jax.lax.fori_loop(0, len(ws), body, (zeros, zeros))


def _transform(rotate: str | tuple[dict[str, jax.Array], int] | None) -> Any:
    """quant_error's rotate= -> a function x (..., d) -> x T, or None."""
    if rotate is None:
        return None
    if isinstance(rotate, str):
        return functools.partial(rot.apply_input_transform, rotate)
    row, max_block = rotate
    return functools.partial(rot.apply_selected, row, max_block=max_block)


def site_stats(
    x: jax.Array,
    ws: Sequence[jax.Array],
    act_mean_sq: jax.Array | None,
    act_absmax: jax.Array | None,
    key: jax.Array,
    group_size: int,
) -> ChannelStats:
    """ChannelStats of all kernels reading x; activation stats default to those of x's rows.
    The weight statistics are reduced kernel by kernel (no float32 copy of all of them: FLUX's
    temb site has 77 kernels, 3.2 B weights)."""
    x = x.astype(jnp.float32)
    row_sq = sum(jnp.sum(jnp.square(k.astype(jnp.float32)), axis=1) for k in ws)
    absmax = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(k.astype(jnp.float32)), axis=1)
                                            for k in ws])
    return ChannelStats(
        act_mean_sq=jnp.mean(jnp.square(x), axis=0) if act_mean_sq is None else act_mean_sq,
        act_absmax=jnp.max(jnp.abs(x), axis=0) if act_absmax is None else act_absmax,
        w_mean_sq=row_sq / sum(k.shape[1] for k in ws),
        w_absmax=absmax,
        w_row_sq=row_sq,
        key=key,
        group_size=group_size,
    )


@functools.partial(
    jax.jit, static_argnames=("wfmt", "afmt", "candidates", "segments", "rotations", "refine")
)
def _search(x, ws, act_mean_sq, act_absmax, key, *, wfmt, afmt, candidates, segments, rotations,
            refine=0):
    """Score every (rotation, order) pair; return the best pair other than the reference
    (rotations[0], identity order) that makes no kernel's error worse than the reference (if
    none does, the best other pair, marked not qualified).

    candidates: the (criterion, alpha) orders; the identity order is scored too, first.
    refine > 0: one more order, last: `refine.refine_order` for that many rounds from the
    candidate order with the lowest error under rotations[0].
    Returns (perm, pair index, E_reference, E per pair, qualified per pair, per-kernel
    errors (reference, best)); E is the error summed over kernels, relative to the summed
    output energy.
    """
    group = (wfmt or afmt).group_size if (wfmt or afmt) else 16
    stats = site_stats(x, ws, act_mean_sq, act_absmax, key, group or x.shape[1])
    d = x.shape[1]
    ident = jnp.arange(d, dtype=jnp.int32)
    orders = [ident] + [
        order_from_scores(get_criterion(name)(stats, alpha), segments)
        for name, alpha in candidates
    ]
    if refine:
        sorted_errs = jax.lax.map(
            lambda p: jnp.sum(quant_error(x, ws, p, wfmt, afmt, rotations[0])[0]),
            jnp.stack(orders[1:]),
        )
        start = jnp.stack(orders[1:])[jnp.argmin(sorted_errs)]
        w_all = jnp.concatenate([k.astype(jnp.float32) for k in ws], axis=1)
        orders.append(refine_order(x, w_all, start, wfmt, afmt, segments, rounds=refine))
    orders = jnp.stack(orders)  # (n_orders, d)
    n = orders.shape[0]
    if len(rotations) == 1:
        nums, dens = jax.lax.map(
            lambda p: quant_error(x, ws, p, wfmt, afmt, rotations[0]), orders
        )
    else:  # one compiled body for every pair: the rotation is data (a row of its table)
        table, max_block = rot.transform_table(rotations, d)

        def pair_error(i):
            row = {k: jnp.asarray(v)[i // n] for k, v in table.items()}
            return quant_error(x, ws, orders[i % n], wfmt, afmt, (row, max_block))

        nums, dens = jax.lax.map(pair_error, jnp.arange(len(rotations) * n))
    # (pairs, kernels), pair = rotation index * n_orders + order index; pair 0 is the
    # reference (rotations[0], identity order), scored by the same program as the others
    num_ref, den = nums[0], dens[0]
    perms = jnp.tile(orders, (len(rotations), 1))
    errs = jnp.sum(nums, axis=1) / jnp.sum(den)
    ok = jnp.all(nums <= num_ref, axis=1)  # per-layer guarantee: no consumer gets worse
    # pair 0 is the reference itself: the best OTHER pair, qualified if any qualifies
    other = jnp.arange(errs.shape[0]) > 0
    ok = ok & other
    best = jnp.where(
        jnp.any(ok),
        jnp.argmin(jnp.where(ok, errs, jnp.inf)),
        jnp.argmin(jnp.where(other, errs, jnp.inf)),
    )
    per_kernel = (num_ref / den, nums[best] / den)
    return perms[best], best, jnp.sum(num_ref) / jnp.sum(den), errs, ok, per_kernel


def rotation_names(rotate: str | Sequence[str | None] | None) -> tuple[str | None, ...]:
    """rotate= of `search` -> canonical candidate names (a name alone: that one only)."""
    if rotate is None or isinstance(rotate, str):
        rotate = (rotate,)
    names = tuple(None if r is None else rot.parse_transform(r).name for r in rotate)
    if not names:
        raise ValueError("search: rotate= is an empty sequence; give None or some names")
    if len(set(names)) != len(names):
        raise ValueError(f"search: rotate= lists a rotation twice: {names}")
    return names


def search(
    x: jax.Array,
    w: jax.Array | Sequence[jax.Array],
    *,
    weights: str | formats.Format | None = "nvfp4",
    acts: str | formats.Format | None = "nvfp4",
    criterion: str | Sequence[str] = "joint_second_moment",
    alpha: float | Sequence[float] = 0.5,
    tau: float = 0.0,
    segments: Segments | None = None,
    act_mean_sq: jax.Array | None = None,
    act_absmax: jax.Array | None = None,
    seed: int = 0,
    rotate: str | Sequence[str | None] | None = None,
    refine: int = 0,
) -> SearchResult:
    """Find a channel order for the layer(s) reading x; see the module docstring.

    criterion/alpha may be sequences: every (criterion, alpha) pair is scored and the best is
    put to the acceptance rule. segments constrain the order (see `Segments`); act_mean_sq /
    act_absmax override the statistics of x's rows with full-calibration ones. None for
    weights/acts leaves that side in full precision. rotate: an input transform name applied
    after the permutation in every error evaluation, or a sequence of candidates (None: no
    rotation) chosen jointly with the order; see the module docstring. refine: rounds of
    `pqjax.permute.refine` (greedy swaps between groups) from the best sorted order, scored
    as one more candidate order ("refine"); 0: off.
    """
    ws = tuple(w) if isinstance(w, (list, tuple)) else (w,)
    if x.ndim != 2 or any(k.ndim != 2 or k.shape[0] != x.shape[1] for k in ws):
        raise ValueError(
            f"search: x must be (tokens, d_in) and w (d_in, d_out); got x {x.shape}, "
            f"w {[k.shape for k in ws]}"
        )
    names = (criterion,) if isinstance(criterion, str) else tuple(criterion)
    alphas = (alpha,) if isinstance(alpha, (int, float)) else tuple(alpha)
    for name in names:
        get_criterion(name)  # unknown names fail here with the list of valid ones
    candidates = tuple((n, float(a)) for n in names for a in alphas)
    wfmt, afmt = as_format(weights), as_format(acts)
    segments = check_segments(segments, x.shape[1])
    rotations = rotation_names(rotate)
    d = x.shape[1]
    for r in rotations:
        if r is not None and rot.parse_transform(r).block > d:
            raise ValueError(f"search: rotation {r!r} has a block wider than d_in={d}")
    perm, best, e_id, errs, ok, (k_id, k_perm) = _search(
        jnp.asarray(x, jnp.float32),
        tuple(jnp.asarray(k) for k in ws),
        act_mean_sq,
        act_absmax,
        jax.random.key(seed),
        wfmt=wfmt,
        afmt=afmt,
        candidates=candidates,
        segments=segments,
        rotations=rotations,
        refine=int(refine),
    )
    orders = (("identity", 0.0), *candidates) + ((("refine", 0.0),) if refine else ())
    errs, ok, best = np.asarray(errs), np.asarray(ok), int(best)
    e_id, e_perm = float(e_id), float(errs[best])
    accepted = bool(ok[best]) and e_id > 0 and (e_id - e_perm) / e_id > tau
    perm = np.asarray(perm)
    cand_rot = rotations[best // len(orders)]
    name, a = orders[best % len(orders)]
    table = tuple(
        (rotations[i // len(orders)], *orders[i % len(orders)], float(e), bool(q) or i == 0)
        for i, (e, q) in enumerate(zip(errs, ok))
    )
    return SearchResult(
        perm=perm if accepted else np.arange(d, dtype=np.int32),
        accepted=bool(accepted),
        err_identity=e_id,
        err_permuted=e_perm,
        criterion=name,
        alpha=a,
        candidate_perm=perm,
        layer_err_identity=tuple(float(e) for e in np.asarray(k_id)),
        layer_err_permuted=tuple(float(e) for e in np.asarray(k_perm)),
        rotate=cand_rot if accepted else rotations[0],
        candidate_rotate=cand_rot,
        table=table,
    )


def layer_errors(
    x: jax.Array,
    ws: Sequence[jax.Array],
    perm: Any,
    wfmt: formats.Format | None,
    afmt: formats.Format | None,
    rotate: str | None = None,
) -> list[float]:
    """Per-kernel relative errors under `perm` (for reports): one float per kernel; with
    `rotate`, of the rotated layer (see the module docstring)."""
    perm = jnp.asarray(perm, jnp.int32)
    num, den = _layer_errors(
        jnp.asarray(x, jnp.float32), tuple(jnp.asarray(w) for w in ws), perm, wfmt, afmt, rotate
    )
    return [float(n / max(d, 1e-30)) for n, d in zip(np.asarray(num), np.asarray(den))]


@functools.partial(jax.jit, static_argnames=("wfmt", "afmt", "rotate"))
def _layer_errors(x, ws, perm, wfmt, afmt, rotate=None):
    return quant_error(x, ws, perm, wfmt, afmt, rotate)
