"""Beyond sorting: greedy channel swaps between neighbouring groups, scored on calibration rows.

    perm2 = refine_order(x, w, perm, wfmt, afmt, segments, rounds=8, k=4)

A sorting criterion places channels by one score; the groups it forms are then fixed. This
search starts from a sorted order and moves channels across group boundaries where that lowers
the measured per-group quantization error:

- the groups are paired with their neighbour in the current order ((0,1), (2,3), ... in even
  rounds, (1,2), (3,4), ... in odd ones; pairs never cross a segment block);
- a move swaps one of the k loudest channels of the lower group with one of the k quietest of
  the upper (by the joint second moment, alpha 0.5), k^2 moves plus "no move" per pair;
- all pairs try their j-th move at once, in one permuted fake-quantization of x and W: a
  group's error depends only on its own members (the NVFP4 per-tensor scale is permutation
  invariant), so each pair's error under its j-th move is read off that one evaluation;
- each pair keeps its best move if it strictly lowers the pair's error.

The per-group error is the diagonal part of the output error on the calibration rows:
sum over channels i of the group of ||W_i||^2 * ||x_i - Q(x)_i||^2 + ||x_i||^2 * ||W_i - Q(W)_i||^2
(the cross-channel terms of ||xW - Q(x)Q(W)||^2 average out). It is a proxy: `permute.search`
(refine=) puts the refined order to the exact error and the acceptance rule like any other.

Cost per round: k^2 + 1 fake-quantizations of x (rows, d) and W (d, d_out), elementwise and
sequential (lax.map: memory of one), no matmul; jit-compiled once per shape.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pqjax import formats
from pqjax.models.sites import Segments


def pair_mask(d: int, group: int, segments: Segments, offset: int) -> np.ndarray:
    """(n_pairs,) bool: pair p = groups (offset + 2p, offset + 2p + 1) lies in one segment
    block (moves inside it keep the order valid)."""
    n_groups = d // group
    block_of = np.empty(d, np.int64)
    start, label = 0, 0
    for size, block in segments:
        for b in range(size // block):
            block_of[start + b * block : start + (b + 1) * block] = label
            label += 1
        start += size
    first = offset + 2 * np.arange((n_groups - offset) // 2)
    lo, hi = block_of[first * group], block_of[(first + 2) * group - 1]
    return lo == hi


def channel_errors(x, w, perm, wfmt, afmt, w_row_sq, x_sq):
    """(d,) diagonal error of each position's channel under `perm` (see the module docstring)."""
    xp = x[:, perm]
    ex = jnp.zeros(xp.shape[1]) if afmt is None else jnp.sum(
        jnp.square(xp - afmt.fake_quant(xp, dtype=jnp.float32)), axis=0)
    wp = w[perm]
    ew = jnp.zeros(wp.shape[0]) if wfmt is None else jnp.sum(
        jnp.square(wp - wfmt.fake_quant(wp.T, dtype=jnp.float32).T), axis=1)
    return w_row_sq[perm] * ex + x_sq[perm] * ew


@functools.partial(jax.jit, static_argnames=("wfmt", "afmt", "group", "rounds", "k"))
def _refine(x, w, perm, score, masks, *, wfmt, afmt, group, rounds, k):
    d = x.shape[1]
    n_groups = d // group
    w_row_sq = jnp.sum(jnp.square(w), axis=1)
    x_sq = jnp.sum(jnp.square(x), axis=0)
    moves = [(a, b) for a in range(group - k, group) for b in range(k)]
    lows = jnp.asarray([a for a, _ in moves], jnp.int32)
    highs = jnp.asarray([b for _, b in moves], jnp.int32)

    def resort(perm):  # within each group, ascending score: the boundary slots are the moves'
        g = perm.reshape(n_groups, group)
        return jnp.take_along_axis(g, jnp.argsort(score[g], axis=1, stable=True), 1).reshape(-1)

    def one_round(perm, offset, mask):
        n_pairs = mask.shape[0]
        first = offset + 2 * jnp.arange(n_pairs)

        def swapped(j):  # perm with the j-th move applied in every pair
            i_lo = first * group + lows[j]
            i_hi = (first + 1) * group + highs[j]
            return perm.at[i_lo].set(perm[i_hi]).at[i_hi].set(perm[i_lo])

        def pair_err(p):
            e = channel_errors(x, w, p, wfmt, afmt, w_row_sq, x_sq).reshape(n_groups, group)
            e = jnp.sum(e, axis=1)
            return e[first] + e[first + 1]

        base = pair_err(perm)  # (n_pairs,)
        errs = jax.lax.map(lambda j: pair_err(swapped(j)), jnp.arange(len(moves)))
        best = jnp.argmin(errs, axis=0)
        gain = (jnp.take_along_axis(errs, best[None], 0)[0] < base) & mask
        i_lo = first * group + lows[best]
        i_hi = (first + 1) * group + highs[best]
        src_lo = jnp.where(gain, perm[i_hi], perm[i_lo])
        src_hi = jnp.where(gain, perm[i_lo], perm[i_hi])
        return resort(perm.at[i_lo].set(src_lo).at[i_hi].set(src_hi))

    def two_rounds(_, perm):  # even pairs, then odd pairs
        return one_round(one_round(perm, 0, masks[0]), 1, masks[1])

    perm = jax.lax.fori_loop(0, rounds // 2, two_rounds, resort(perm))
    return one_round(perm, 0, masks[0]) if rounds % 2 else perm


def refine_order(
    x: jax.Array,
    w: jax.Array,
    perm: jax.Array,
    wfmt: formats.Format | None,
    afmt: formats.Format | None,
    segments: Segments,
    *,
    score: jax.Array | None = None,
    rounds: int = 8,
    k: int = 4,
) -> jax.Array:
    """Refine `perm (d,)` for the layer(s) x `(rows, d)` @ w `(d, d_out)` (several consumers:
    their kernels concatenated along d_out); see the module docstring. score `(d,)`: orders
    channels inside a group (default: the joint second moment). Returns the new perm; the
    input perm unchanged when d is not a whole number of groups of at least two groups."""
    fmt = wfmt or afmt
    group = fmt.group_size if fmt is not None and fmt.group_size else None
    d = x.shape[1]
    if group is None or d % group or d // group < 2 or rounds < 1:
        return jnp.asarray(perm, jnp.int32)
    k = min(k, group)
    x = jnp.asarray(x, jnp.float32)
    w = jnp.asarray(w, jnp.float32)
    if score is None:
        ms_x = jnp.mean(jnp.square(x), axis=0)
        ms_w = jnp.mean(jnp.square(w), axis=1)
        score = 0.5 * jnp.log(jnp.maximum(ms_x, 1e-30)) + 0.5 * jnp.log(jnp.maximum(ms_w, 1e-30))
    masks = tuple(jnp.asarray(pair_mask(d, group, segments, o)) for o in (0, 1))
    return _refine(x, w, jnp.asarray(perm, jnp.int32), score, masks, wfmt=wfmt, afmt=afmt,
                   group=group, rounds=rounds, k=k)


def proxy_error(x, w, perm, wfmt, afmt) -> float:
    """The summed diagonal error (module docstring) of `perm`: what refine_order lowers."""
    x = jnp.asarray(x, jnp.float32)
    w = jnp.asarray(w, jnp.float32)
    e = channel_errors(x, w, jnp.asarray(perm, jnp.int32), wfmt, afmt,
                       jnp.sum(jnp.square(w), axis=1), jnp.sum(jnp.square(x), axis=0))
    return float(jnp.sum(e))
