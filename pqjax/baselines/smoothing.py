"""Per-channel smoothing on the shared site machinery, and SmoothQuant as a method.

    model2 = absorb_scales(model, {site.name: s})       # exact in full precision; a clone
    qmodel, report = pqjax.quantize(model, calib, QuantConfig(method="smoothquant"))

A scale s `(dim,)` > 0 on a site divides the site's channels where they are produced and
multiplies every consumer's kernel rows: x' = x / s, W' = diag(s) W, so x' W' = x W. Where the
producer is linear in its output (a Linear's columns, an AdaLN shift chunk, a norm's affine
weights) the division folds into it; an AdaLN scale chunk used as (1 + m) folds as
(1 + m') = (1 + m) / s. Through a nonlinearity (`Site.scalable` False) nothing folds and the
consumer applies `input_scale` = 1 / s online (`QuantLinear`).

`smoothing_plan` is the driver that SmoothQuant, SVDQuant and PTQ4DiT share: per site it scores
candidate scales by the summed quantized output error of its quantized consumers on their
calibration rows, keeps the best, folds it (or sets it online), and reports per-layer errors in
the original output space (so err and err_rtn compare like with like).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pqjax import formats, permute
from pqjax.calibrate import Calibration, LayerStats
from pqjax.methods import Option, Plan, kernel_of, model_sites, register_method, rtn_errors
from pqjax.models.layers import Linear
from pqjax.models.paths import module_at
from pqjax.permute.sites import Edit, Site

if TYPE_CHECKING:
    from pqjax.quantize import QuantConfig

_HIGHEST = jax.lax.Precision.HIGHEST
_EPS = 1e-5  # floor for saliences: a dead channel must not give a zero or infinite scale
DEFAULT_ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)

# (site, act absmax (d,), weight absmax (d,), stats of the quantized consumers)
#   -> [(report fields, scale (d,)), ...]
Candidates = Callable[
    [Site, np.ndarray, np.ndarray, list[LayerStats]], list[tuple[dict[str, Any], np.ndarray]]
]


# ---------------------------------------------------------------------------------------------
# Folding


def _divide_slice(model: nnx.Module, edit: Edit, s: np.ndarray, site: Site) -> None:
    """Divide the edit's slice by s (role "linear"), or fold s into a (1 + m) chunk; a
    "perm_only" slice (a GLU's gate half) takes no scale."""
    if edit.role == "perm_only":
        return
    start, stop = edit.channels or (0, site.dim)
    sub = jnp.asarray(s[start:stop])
    var = module_at(model, edit.param)
    if not isinstance(var, nnx.Variable):
        raise TypeError(f"site {site.name}: {edit.param} is not a parameter")
    value = var.get_value()
    target = value if edit.index is None else value[edit.index]
    where = [slice(None)] * target.ndim
    where[edit.axis] = slice(edit.offset, edit.offset + len(sub))
    shape = [1] * target.ndim
    shape[edit.axis] = len(sub)
    piece, fac = target[tuple(where)].astype(jnp.float32), sub.reshape(shape)
    if edit.role == "mod_scale" and edit.param.rsplit(".", 1)[-1] == "bias":
        new = (piece + 1.0) / fac - 1.0  # (1 + m) / s = 1 + m'
    elif edit.role in ("linear", "mod_scale"):
        new = piece / fac
    else:
        raise ValueError(f"site {site.name}: edit {edit.param} has unknown role {edit.role!r}")
    target = target.at[tuple(where)].set(new.astype(target.dtype))
    var.set_value(target if edit.index is None else value.at[edit.index].set(target))


def _fold_site(model: nnx.Module, site: Site, s: np.ndarray) -> None:
    for path in site.consumers:
        layer = module_at(model, path)
        if not isinstance(layer, Linear):
            raise TypeError(
                f"site {site.name}: consumer {path} is a {type(layer).__name__}, not a "
                "full-precision Linear; absorb scales before quantizing"
            )
        k = layer.kernel.get_value()
        layer.kernel.set_value((k.astype(jnp.float32) * s[:, None]).astype(k.dtype))
    for edit in site.edits:
        _divide_slice(model, edit, s, site)
    if any(e.role == "mod_scale" for e in site.edits):
        return  # the (1 + m) chunk carries the whole norm output (affine included)
    for path in site.norms:
        norm = module_at(model, path)
        if getattr(norm, "scale", None) is None:
            raise ValueError(
                f"site {site.name}: norm {path} has no affine weight and the site no AdaLN "
                "scale chunk, so a per-channel scale has nowhere to fold"
            )
        for name in ("scale", "bias"):
            var = getattr(norm, name, None)
            if var is not None:
                v = var.get_value()
                var.set_value((v.astype(jnp.float32) / s).astype(v.dtype))


def _check_scale(name: str, s: Any, dim: int) -> np.ndarray:
    s = np.asarray(s, np.float32)
    if s.shape != (dim,) or not np.all(np.isfinite(s)) or not np.all(s > 0):
        raise ValueError(f"site {name}: a scale must be finite, > 0 and of shape ({dim},)")
    return s


def absorb_scales(
    model: nnx.Module, scales: Mapping[str, Any], *, site_list: list[Site] | None = None
) -> nnx.Module:
    """A copy of `model` with per-channel scales folded in: the same function in full precision.

    scales: site name -> s `(dim,)` > 0; channel j of the site becomes x_j / s_j and every
    consumer's kernel row j is multiplied by s_j. Only `scalable` sites fold (the others need
    `QuantLinear.input_scale`, see the module docstring). The input model is unchanged.
    """
    by_name = {s.name: s for s in (site_list if site_list is not None else permute.sites(model))}
    unknown = sorted(set(scales) - set(by_name))
    if unknown:
        raise KeyError(f"unknown sites {unknown[:5]}; e.g. {sorted(by_name)[:5]}")
    out = nnx.clone(model)
    for name, s in scales.items():
        site = by_name[name]
        if not site.scalable:
            raise ValueError(
                f"site {name}: a nonlinearity sits between producer and consumers, so a scale "
                "cannot fold offline; use QuantLinear.input_scale = 1 / s instead"
            )
        _fold_site(out, site, _check_scale(name, s, site.dim))
    return out


def column_scales(
    model: nnx.Module, site_list: list[Site], scales: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    """Linear path -> `(d_out,)` factor its output columns were divided by in absorb_scales.

    Multiplying a folded layer's output by it maps the layer back to the original output space.
    """
    by_name = {s.name: s for s in site_list}
    out: dict[str, np.ndarray] = {}
    for name, s in scales.items():
        site = by_name[name]
        for e in site.edits:
            path, _, leaf = e.param.rpartition(".")
            if leaf != "kernel" or e.index is not None or e.axis != 1:
                continue
            start, stop = e.channels or (0, site.dim)
            fac = out.setdefault(path, np.ones(module_at(model, path).out_features, np.float32))
            fac[e.offset : e.offset + stop - start] *= np.asarray(s[start:stop], np.float32)
    return out


# ---------------------------------------------------------------------------------------------
# Scales and errors


def migration_scales(act_absmax: Any, w_absmax: Any, alpha: float) -> np.ndarray:
    """SmoothQuant's s_j = max|x_j|^alpha / max|W_j|^(1 - alpha), `(d,)` float32."""
    a = np.maximum(np.asarray(act_absmax, np.float64), _EPS)
    w = np.maximum(np.asarray(w_absmax, np.float64), _EPS)
    return (a**alpha / w ** (1.0 - alpha)).astype(np.float32)


def keep_act_range(s: np.ndarray, act_absmax: Any) -> np.ndarray:
    """s rescaled so that max_j |x_j| / s_j equals max_j |x_j|.

    The quantized layer takes its NVFP4 activation global scale from the calibrated absmax of
    the original input; a constant factor on s keeps that range valid (weights absorb it).
    """
    a = np.maximum(np.asarray(act_absmax, np.float64), _EPS)
    return (s * (np.max(a / s) / np.max(a))).astype(np.float32)


def low_rank_split(k: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """Top-`rank` SVD factors of k `(d_in, d_out)`: down `(d_in, r)`, up `(r, d_out)`.

    Singular values are split evenly (sqrt on each side) to keep both factors' ranges alike.
    """
    u, sv, vt = jnp.linalg.svd(k.astype(jnp.float32), full_matrices=False)
    root = jnp.sqrt(sv[:rank])
    return u[:, :rank] * root, root[:, None] * vt[:rank]


@functools.partial(jax.jit, static_argnames=("wfmt", "afmt", "rank"))
def smoothed_error(
    x: jax.Array,
    s: jax.Array,
    k: jax.Array,
    col: jax.Array,
    *,
    wfmt: formats.Format | None,
    afmt: formats.Format | None,
    rank: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """(||y - y_q||^2, ||y||^2) of a smoothed layer, in the original output space.

    x `(n, d_in)`: original input rows; the layer reads x / s `(d_in,)` with full-precision
    kernel k `(d_in, d_out)`, whose output times col `(d_out,)` is the original output y.
    With rank > 0 the top-rank SVD of k stays in full precision and only the residual is
    quantized (SVDQuant). Same definition as `permute.search.quant_error`.
    """
    xs = x / s
    y = jnp.dot(xs, k, precision=_HIGHEST) * col
    res, branch = k, 0.0
    if rank:
        down, up = low_rank_split(k, rank)
        res = k - jnp.dot(down, up, precision=_HIGHEST)
        branch = jnp.dot(jnp.dot(xs, down, precision=_HIGHEST), up, precision=_HIGHEST)
    xq = xs if afmt is None else afmt.fake_quant(xs, dtype=jnp.float32)
    wq = res if wfmt is None else wfmt.fake_quant(res.T, dtype=jnp.float32).T
    yq = (jnp.dot(xq, wq, precision=_HIGHEST) + branch) * col
    return jnp.sum(jnp.square(y - yq)), jnp.sum(jnp.square(y))


# ---------------------------------------------------------------------------------------------
# The shared driver


def plan_sites(model: nnx.Module, targets: Sequence[str], sites: list[Site] | None = None
               ) -> tuple[list[Site], list[Site]]:
    """(the sites given, or the model's own, and one online-only site per target that no site
    covers)."""
    try:
        real = model_sites(model, sites)
    except TypeError:  # a model without declared sites: every layer smooths online
        real = []
    covered = {c for s in real for c in s.consumers}
    extra = [
        Site(
            f"{p}:in", module_at(model, p).in_features, consumers=(p,), kind="layer", scalable=False
        )
        for p in targets
        if p not in covered
    ]
    return real, extra


def _site_error(calib, read, kernels, s, wfmt, afmt, rank) -> float:
    """Summed relative error of the consumers `read` with their kernels smoothed by s."""
    nums, dens = [], []
    for path in read:
        k = jnp.asarray(s)[:, None] * kernels[path]
        one = jnp.ones((k.shape[1],), jnp.float32)
        n, d = smoothed_error(
            calib[path].rows, jnp.asarray(s), k, one, wfmt=wfmt, afmt=afmt, rank=min(rank, *k.shape)
        )
        nums.append(float(n))
        dens.append(float(d))
    return sum(nums) / max(sum(dens), 1e-30)


def smoothing_plan(
    model: nnx.Module,
    calib: Calibration,
    config: QuantConfig,
    targets: list[str],
    candidates: Candidates,
    *,
    rank: int = 0,
    sites: list[Site] | None = None,
) -> Plan:
    """Pick a scale per site among `candidates`, fold or set it online, report the errors.

    rank > 0 also splits each smoothed kernel into a top-rank SVD branch (Plan.extras
    "low_rank") and a residual to quantize (Plan.kernels): SVDQuant. sites: see
    `pqjax.methods` (None: the model's own).
    """
    wfmt, afmt = config.weight_format(), config.act_format()
    wanted = set(targets)
    real, extra = plan_sites(model, targets, sites)
    chosen: dict[str, tuple[Site, np.ndarray]] = {}
    site_rows: dict[str, dict[str, Any]] = {}
    for site in real + extra:
        read = [c for c in site.consumers if c in wanted and c in calib]
        if not read:
            continue
        # folded scales touch every consumer's rows; online ones only the quantized consumers'
        owners = site.consumers if site.scalable else tuple(read)
        kernels = {c: kernel_of(model, c).astype(jnp.float32) for c in owners}
        w_absmax = np.max([np.max(np.abs(np.asarray(k)), axis=1) for k in kernels.values()], 0)
        a = np.max([np.asarray(calib[c].absmax) for c in read], axis=0)
        best = None
        for info, s in candidates(site, a, w_absmax, [calib[c] for c in read]):
            s = keep_act_range(_check_scale(site.name, s, site.dim), a)
            err = _site_error(calib, read, kernels, s, wfmt, afmt, rank)
            if best is None or err < best[0]:
                best = (err, info, s)
        err, info, s = best
        chosen[site.name] = (site, s)
        site_rows[site.name] = {
            "kind": site.kind,
            "dim": site.dim,
            "folded": site.scalable,
            "err": err,
            **info,
        }
    folded = {n: s for n, (site, s) in chosen.items() if site.scalable}
    smoothed = absorb_scales(model, folded, site_list=real)
    cols = column_scales(model, real, folded)
    site_of = {c: n for n, (site, _) in chosen.items() for c in site.consumers if c in wanted}
    rtn = rtn_errors(model, calib, config, targets)
    kernels, extras, layers = {}, {}, {}
    for path in targets:
        if path not in site_of:
            continue
        site, s = chosen[site_of[path]]
        k = kernel_of(smoothed, path).astype(jnp.float32)
        ex: dict[str, Any] = {}
        if not site.scalable:
            k = jnp.asarray(s)[:, None] * k
            ex["input_scale"] = jnp.asarray(1.0 / s)
        r = min(rank, *k.shape)
        if r:
            dtype = kernel_of(model, path).dtype  # the 16-bit branch runs in the model's dtype
            down, up = (f.astype(dtype) for f in low_rank_split(k, r))
            # the residual is taken against the branch as stored, so R + L1 L2 stays W^
            kernels[path] = k - jnp.dot(down, up, precision=_HIGHEST).astype(jnp.float32)
            ex["low_rank"] = (down, up)
        elif not site.scalable:
            kernels[path] = k
        if ex:
            extras[path] = ex
        col = jnp.asarray(cols.get(path, np.ones(k.shape[1], np.float32)))
        n, d = smoothed_error(
            calib[path].rows, jnp.asarray(s), k, col, wfmt=wfmt, afmt=afmt, rank=r
        )
        info = {
            key: v
            for key, v in site_rows[site.name].items()
            if key not in ("err", "dim") and np.ndim(v) == 0
        }  # per-site lists stay there
        layers[path] = {
            "site": site.name,
            "err_rtn": rtn[path],
            "err": float(n) / max(float(d), 1e-30),
            **info,
        }
    return Plan(model=smoothed, kernels=kernels, extras=extras, layers=layers, sites=site_rows)


ALPHAS = Option((tuple, list), DEFAULT_ALPHAS, "migration strengths to search, in [0, 1]",
               unit=True)


def alpha_grid(config: QuantConfig) -> tuple[float, ...]:
    """The migration strengths to search: `config.option("alphas")`, default 0.3..0.8."""
    return tuple(float(a) for a in config.option("alphas", DEFAULT_ALPHAS))


def alpha_candidates(alphas: Sequence[float]) -> Candidates:
    def candidates(site, act_absmax, w_absmax, stats):
        return [({"alpha": a}, migration_scales(act_absmax, w_absmax, a)) for a in alphas]

    return candidates


@register_method("smoothquant", options={"alphas": ALPHAS})
def smoothquant(
    model: nnx.Module, calib: Calibration, config: QuantConfig, targets: list[str],
    sites: list[Site] | None = None,
) -> Plan:
    """SmoothQuant: s_j = max|x_j|^a / max|W_j|^(1-a) per site, a searched on calibration rows.

    W_j is row j of every consumer's kernel; a is chosen per site from `config.option("alphas")`
    by the lowest summed W/A-quantized output error of the site's quantized consumers.
    """
    return smoothing_plan(model, calib, config, targets, alpha_candidates(alpha_grid(config)),
                          sites=sites)
