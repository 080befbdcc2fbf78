"""Permutation search with PermuQuant's acceptance rule, as jit-compiled array programs.

    res = search(x, w, weights="nvfp4", acts="nvfp4", criterion="joint_second_moment",
                 alpha=0.5, tau=0.0)
    res.perm, res.accepted, res.err_identity, res.err_permuted

x: `(tokens, d_in)` calibration activations; w: `(d_in, d_out)` Flax kernel, or a sequence of
kernels that all read x (the consumers of one permutation site). Groups run along d_in for
both. err = ||x W - Q(x) Q(W)||^2 / ||x W||^2 summed over consumers (each weight quantized on
its own). The order is accepted only if (E_identity - E_permuted) / E_identity > tau and no
consumer's own error grows, so every layer is at least as good as RTN on the calibration rows.

Rotation hook (`rotate=`, default None: no rotation): the name of an online input transform of
`pqjax.rotate` (e.g. "hadamard:16") applied AFTER the permutation, the weight holding its
inverse: errors become ||x W - Q(x P T) Q(T^T P^T W)||^2 / ||x W||^2, so identity and permuted
orders are compared with the rotation applied in both (PermuQuant + in-group Hadamard).
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
from pqjax.permute.criteria import ChannelStats, get_criterion

# (size, block): the permutation acts within consecutive blocks of `block` channels of a
# segment of `size` channels (block == size: free order; block == head_dim: within heads).
Segments = tuple[tuple[int, int], ...]
_HIGHEST = jax.lax.Precision.HIGHEST


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
    layer_err_identity: tuple[float, ...] = ()  # per kernel, identity order
    layer_err_permuted: tuple[float, ...] = ()  # per kernel, candidate order

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
    rotate: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Per kernel `(n_kernels,)`: ||y - y_q||^2 and ||y||^2, inputs read in `perm` order and,
    with `rotate`, quantized after the input transform (weights after its fold)."""
    xp = x[:, perm]
    xr = xp if rotate is None else rot.apply_input_transform(rotate, xp)
    xq = xr if afmt is None else afmt.fake_quant(xr, dtype=jnp.float32)
    nums, dens = [], []
    for w in ws:
        wp = w[perm].astype(jnp.float32)
        wr = wp if rotate is None else rot.fold_into_kernel(rotate, wp)
        wq = wr if wfmt is None else wfmt.fake_quant(wr.T, dtype=jnp.float32).T
        y = jnp.dot(xp, wp, precision=_HIGHEST)
        yq = jnp.dot(xq, wq, precision=_HIGHEST)
        nums.append(jnp.sum(jnp.square(y - yq)))
        dens.append(jnp.sum(jnp.square(y)))
    return jnp.stack(nums), jnp.stack(dens)


def site_stats(
    x: jax.Array,
    ws: Sequence[jax.Array],
    act_mean_sq: jax.Array | None,
    act_absmax: jax.Array | None,
    key: jax.Array,
    group_size: int,
) -> ChannelStats:
    """ChannelStats of all kernels reading x; activation stats default to those of x's rows."""
    w = jnp.concatenate([k.astype(jnp.float32) for k in ws], axis=1)
    x = x.astype(jnp.float32)
    return ChannelStats(
        act_mean_sq=jnp.mean(jnp.square(x), axis=0) if act_mean_sq is None else act_mean_sq,
        act_absmax=jnp.max(jnp.abs(x), axis=0) if act_absmax is None else act_absmax,
        w_mean_sq=jnp.mean(jnp.square(w), axis=1),
        w_absmax=jnp.max(jnp.abs(w), axis=1),
        w_row_sq=jnp.sum(jnp.square(w), axis=1),
        key=key,
        group_size=group_size,
    )


@functools.partial(jax.jit, static_argnames=("wfmt", "afmt", "candidates", "segments", "rotate"))
def _search(x, ws, act_mean_sq, act_absmax, key, *, wfmt, afmt, candidates, segments, rotate):
    """Score every candidate order; return the best one that makes no kernel's error worse.

    Returns (perm, candidate index, E_identity, E_best, any candidate qualified); E is the
    error summed over kernels, relative to the summed output energy.
    """
    group = (wfmt or afmt).group_size if (wfmt or afmt) else 16
    stats = site_stats(x, ws, act_mean_sq, act_absmax, key, group or x.shape[1])
    d = x.shape[1]
    num_id, den = quant_error(x, ws, jnp.arange(d, dtype=jnp.int32), wfmt, afmt, rotate)
    perms, errs, ok = [], [], []
    for name, alpha in candidates:
        perm = order_from_scores(get_criterion(name)(stats, alpha), segments)
        num, _ = quant_error(x, ws, perm, wfmt, afmt, rotate)
        perms.append(perm)
        errs.append(jnp.sum(num) / jnp.sum(den))
        ok.append(jnp.all(num <= num_id))  # per-layer guarantee: no consumer gets worse
    errs, ok = jnp.stack(errs), jnp.stack(ok)
    best = jnp.argmin(jnp.where(ok, errs, jnp.inf))
    perm = jnp.stack(perms)[best]
    num_best, _ = quant_error(x, ws, perm, wfmt, afmt, rotate)
    per_kernel = (num_id / den, num_best / den)
    return perm, best, jnp.sum(num_id) / jnp.sum(den), errs[best], ok[best], per_kernel


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
    rotate: str | None = None,
) -> SearchResult:
    """Find a channel order for the layer(s) reading x; see the module docstring.

    criterion/alpha may be sequences: every (criterion, alpha) pair is scored and the best is
    put to the acceptance rule. segments constrain the order (see `Segments`); act_mean_sq /
    act_absmax override the statistics of x's rows with full-calibration ones. None for
    weights/acts leaves that side in full precision. rotate: an input transform name applied
    after the permutation in every error evaluation (see the module docstring).
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
    perm, best, e_id, e_perm, qualified, (k_id, k_perm) = _search(
        jnp.asarray(x, jnp.float32),
        tuple(jnp.asarray(k) for k in ws),
        act_mean_sq,
        act_absmax,
        jax.random.key(seed),
        wfmt=wfmt,
        afmt=afmt,
        candidates=candidates,
        segments=segments,
        rotate=None if rotate is None else rot.parse_transform(rotate).name,
    )
    e_id, e_perm = float(e_id), float(e_perm)
    accepted = bool(qualified) and e_id > 0 and (e_id - e_perm) / e_id > tau
    perm = np.asarray(perm)
    name, a = candidates[int(best)]
    return SearchResult(
        perm=perm if accepted else np.arange(x.shape[1], dtype=np.int32),
        accepted=bool(accepted),
        err_identity=e_id,
        err_permuted=e_perm,
        criterion=name,
        alpha=a,
        candidate_perm=perm,
        layer_err_identity=tuple(float(e) for e in np.asarray(k_id)),
        layer_err_permuted=tuple(float(e) for e in np.asarray(k_perm)),
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
