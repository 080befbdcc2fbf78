"""Rotation baselines: `hadamard` (QuaRot-style) and `permuquant_h` (permutation and rotation).

hadamard: every quantized Linear gets the block Hadamard T = "hadamard:<b>" of its input
channels, b = the quantization group (`pqjax.rotate.block_for`; QuantConfig option "block"
overrides, "seed" adds random signs). T is folded offline into the kernel (T^T W, Plan.kernels)
and applied online to the activations (QuantLinear.input_transform), then RTN per group.
Full-precision output is unchanged; the quantizers see each group's energy spread over the
group, which flattens outlier channels.

permuquant_hs: permuquant_h with a per-channel scale in the choice. At every scalable site
(`Site.scalable`: the division folds into the producer) each of SmoothQuant's migration scales
s = max|x_j|^a / max|W_j|^(1-a) (a in option "alphas", `site_scale`) gets its own joint choice
on x / s and diag(s) W, next to the choice without a scale; the lowest summed calibration error
whose consumers all stay at or below RTN on their own rows is kept (so at every site it ends at
most at permuquant_h's error). The scale folds as SmoothQuant's (`smoothing.absorb_scales`),
then the order is absorbed and the rotation folded. With option "online", sites where no scale
folds (after GELU or SiLU, FLUX's temb) and layers no site reads get the same choice, the
scale applied by each consumer (`QuantLinear.input_scale`: one multiply per input element
before the quantizer, as smoothquant and svdquant do there; every consumer of such a site must
be quantized). Off by default: on the real layers of benchmarks/real_layers.py it lowered
the geometric means by under 1% and, at NVFP4, made one FFN output layer 14% worse than RTN
held out (5% better on the calibration half). The layers' errors are reported as chosen: a
scale folded into a producing Linear's output columns rescales that layer's groups, which
leaves INT errors unchanged and NVFP4's within its E4M3 scale rounding, and is not
re-measured. With option rotations "rotated" or "fixed" no scale is tried.

permuquant_h: the joint choice of rotation and order at every site (`permute.search(...,
rotate=candidates)`): no change, the order alone, a rotation alone, or order + rotation, among
the rotations of `rotation_candidates` (None, then every kind of `pqjax.rotate` and every legal
block from the group size up to the site's width). The acceptance rule applies to the pair:
no consumer's error may exceed RTN's and the summed error must fall. Consumers no site reads
get the rotation choice alone (order fixed). Since the candidates hold both PermuQuant's pair
(None, sorted order) and Hadamard's (in-group block, identity order), on calibration rows a
single-consumer site or unsited layer ends at most at min(RTN, PermuQuant, Hadamard); a site
with several consumers (one rotation for all, the order is shared) at most at PermuQuant's
summed error and at Hadamard's whenever no consumer is worse than RTN under it.
Option "rotate_per_image" ("yes" by default; "no"; "auto": "no" with NVFP4 activations, else
"yes") can withhold the rotation candidates at per-image sites (`Site.per_image`: FLUX's temb
and Z-Image's adaln, one conditioning row per image read by every AdaLN linear), whose bound is
then PermuQuant's alone. Measured on the embedded model (2026-12-07, three calibration draws,
50 images each, paired per image; benchmarks/calib_draws.py --against): without them
PermuQuant-H at INT4 g64 is worse in every draw (-0.57 +- 0.26 dB over draws,
results/calib_draws_rpi_no.md); at NVFP4 "auto" is better in one draw of three (+0.63 +-
0.26 dB, the draw of benchmarks/compare_methods.py) and not distinguishable in the others
(results/calib_draws_rpi_auto.md; both before the bias correction below). One draw is not
enough to give up the bound by default.
Accepted orders are absorbed (`permute.absorb`), then each consumer's rotation is folded into
its permuted kernel. Option "bias_correction" (default on; permuquant_hr and -hs too): each
quantized layer's mean output error on its calibration rows, as deployed, is subtracted from
its bias (`pqjax.baselines.bias_correction`, Plan extras; the plan's model stays exact). The
choice minimizes the per-row error, but the sampling loop does not damp the part every token
shares: on the embedded model at NVFP4 PermuQuant-H's final latent error was 17% one
image-wide offset (2% for PermuQuant) and 1 dB below PermuQuant; the correction gains
PermuQuant-H +1.4 to +2.8 dB over three calibration draws, PermuQuant +0.6 to +0.75
(benchmarks/coherent_error.py). Layers without calibration rows stay unrotated. Option
rotations="fixed" restores the behaviour before the joint choice (the in-group Hadamard on
every layer, orders compared under it).

Blocks larger than the group mix groups; every block is deployable because `QuantLinear`
(and the Pallas dispatch, `pqjax.backends.dispatch`) applies the transform online in XLA
before the activation quantizer; a rotated consumer is not fused into its producing norm.

Report rows: err_rtn (plain RTN), err_reference (the acceptance reference: RTN for the
default candidates), err (what the method deploys, on calibration rows), transform (the name
or None), act_amax_growth. hadamard's rows: err_rtn, err, transform, act_amax_growth; the
rotation alone carries no guarantee against RTN: err may exceed err_rtn (NVFP4 in particular).

NVFP4's static activation global scale: a rotated block's absmax can exceed the input's by up
to sqrt(b) (Sylvester on a constant block), and E4M3 block scales derived from the unrotated
absmax then saturate at run time (before 2026-12-07 they did: growth up to 2.26x on 18 of the
embedded model's 40 permuquant_h layers; NVFP4 32.39 -> 32.95 dB once fixed). Every rotated layer's
plan therefore carries "act_amax" = act_amax_growth x the calibrated absmax, where
act_amax_growth = max |x T| / max |x| on the calibration rows (in the site's order and scale),
so the static scale fits the rotated input as the search's dynamic per-tensor scale did.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pqjax import permute, rotate
from pqjax.baselines.bias_correction import layer_bias_correction
from pqjax.baselines.rotation_choice import (
    JOINT_OPTIONS,
    ROTATION_OPTIONS,
    rotation_candidates,
    site_candidates,
    transform_for,
)
from pqjax.baselines.smooth_search import best_smoothed, smoothed, smoothed_search
from pqjax.baselines.smoothing import absorb_scales
from pqjax.calibrate import Calibration
from pqjax.methods import Option, Plan, kernel_of, model_sites, register_method, rtn_errors
from pqjax.models.paths import module_at

if TYPE_CHECKING:
    from pqjax.quantize import QuantConfig


def rotated_error(
    calib: Calibration, config: QuantConfig, path: str, kernel: Any, name: str
) -> float | None:
    """Relative error of the rotated layer on its calibration rows (None without rows)."""
    if path not in calib:
        return None
    rows = calib[path].rows
    wfmt, afmt = config.weight_format(), config.act_format()
    return permute.layer_errors(rows, [kernel], np.arange(rows.shape[1]), wfmt, afmt, name)[0]


@functools.partial(jax.jit, static_argnames="name")
def _amax_growth(name: str, rows: jax.Array) -> jax.Array:
    """max |rows T| / max |rows| for rows (n, d)."""
    rotated = rotate.apply_input_transform(name, rows.astype(jnp.float32))
    return jnp.max(jnp.abs(rotated)) / jnp.maximum(jnp.max(jnp.abs(rows)), 1e-30)


def amax_growth(calib: Calibration, path: str, name: str, perm: Any = None,
                scale: np.ndarray | None = None) -> float | None:
    """How much the rotation raises the activation absmax on the calibration rows (divided by
    the site's folded `scale` and in its absorbed order `perm`, if any); None without rows."""
    if path not in calib:
        return None
    rows = calib[path].rows
    if scale is not None:
        rows = jnp.asarray(rows, jnp.float32) / jnp.asarray(scale, jnp.float32)
    return float(_amax_growth(name, rows if perm is None else rows[:, perm]))


def rotated_act_amax(calib: Calibration, path: str, growth: float,
                     scale: np.ndarray | None = None) -> dict[str, float]:
    """{"act_amax": the calibrated absmax of what the rotated layer's activation quantizer
    reads}, `growth` (`amax_growth`) times max |x / scale| over every calibrated token: the
    static NVFP4 activation global scale then fits the rotated input (Plan.extras)."""
    a = np.asarray(calib[path].absmax, np.float32)
    if scale is not None:
        a = a / np.asarray(scale, np.float32)
    return {"act_amax": float(growth) * float(a.max())}


def rotation_plan(
    model: nnx.Module, calib: Calibration, config: QuantConfig, targets: list[str], kind: str
) -> Plan:
    """Fold a per-layer block rotation of `kind` into every target (shared by convrot)."""
    rtn = rtn_errors(model, calib, config, targets)
    plan = Plan(model=nnx.clone(model))
    for path in targets:
        kernel = kernel_of(model, path)
        name = transform_for(config, kernel.shape[0], kind)
        plan.kernels[path] = rotate.fold_into_kernel(name, kernel)
        plan.extras[path] = {"input_transform": name}
        err = rotated_error(calib, config, path, kernel, name)
        if err is not None:
            growth = amax_growth(calib, path, name)
            plan.extras[path].update(rotated_act_amax(calib, path, growth))
            plan.layers[path] = {
                "err_rtn": rtn[path],
                "err": err,
                "transform": name,
                "act_amax_growth": growth,
            }
    return plan


@register_method("hadamard", options=ROTATION_OPTIONS)
def hadamard(
    model: nnx.Module, calib: Calibration, config: QuantConfig, targets: list[str],
    sites: list[permute.Site] | None = None,
) -> Plan:
    """Block Hadamard of each group folded into the weights and applied online, then RTN."""
    return rotation_plan(model, calib, config, targets, "hadamard")


def _own_rows(model: nnx.Module, calib: Calibration, site: permute.Site,
              res: permute.SearchResult, wfmt: Any, afmt: Any,
              guard: bool = True, scale: np.ndarray | None = None) -> dict[str, tuple] | None:
    """{consumer: (RTN error, error of the chosen pair)}, each on the consumer's OWN rows (the
    search reads the first consumer's; FLUX's to_add_out reads the text part of the attention
    output), scored as `rtn_errors` scores RTN. With `guard` (the candidates start with no
    rotation, so RTN is the reference), None when the chosen pair makes any consumer worse than
    its RTN there: the acceptance rule then keeps no change. scale `(dim,)`: the pair was
    chosen on smoothed rows x / scale and kernels diag(scale) W (permuquant_hs)."""
    if not guard:  # the reference is a rotation: the search's own errors, against it
        after = res.layer_err_permuted if res.accepted else res.layer_err_identity
        return dict(zip(site.consumers, zip(res.layer_err_identity, after, strict=True),
                        strict=True))
    ident = np.arange(site.dim)
    perm = res.perm if res.accepted else ident
    out = {}
    for c in site.consumers:
        if c not in calib:
            continue
        rows, kernel = calib[c].rows, kernel_of(model, c)
        ref = permute.layer_errors(rows, [kernel], ident, wfmt, afmt, None)[0]
        if perm is ident and res.rotate is None and scale is None:
            out[c] = (ref, ref)
            continue
        if scale is not None:
            rows, kernel = smoothed(rows, kernel, scale)
        err = permute.layer_errors(rows, [kernel], perm, wfmt, afmt, res.rotate)[0]
        if guard and err > ref:
            return None
        out[c] = (ref, err)
    return out


def _row(res: permute.SearchResult, err_ref: float, err: float) -> dict[str, Any]:
    return {
        "err_reference": err_ref,
        "err": err,
        "accepted": res.accepted,
        "criterion": res.criterion if res.accepted else "identity",
        "alpha": res.alpha,
        "transform": res.rotate,
    }


def _site_choice(model: nnx.Module, calib: Calibration, config: QuantConfig,
                 site: permute.Site, seed: int, refine: int, alphas: tuple[float, ...]
                 ) -> tuple[float | None, np.ndarray | None, permute.SearchResult, dict]:
    """(smoothing strength or None, scale or None, the search's result, own-rows errors) of
    the site: the joint (rotation, order) choice without a scale and under each strength's
    scale in `alphas` (empty: none tried); the lowest summed calibration error whose consumers
    all pass the acceptance rule on their own rows is kept."""
    wfmt, afmt = config.weight_format(), config.act_format()
    stats = calib[site.consumers[0]]
    kernels = [kernel_of(model, c) for c in site.consumers]
    candidates = site_candidates(config, site)
    guard = candidates[0] is None
    best = None
    for strength in (None, *alphas) if guard else (None,):
        s, res = smoothed_search(
            stats.rows, kernels, strength, act_absmax=stats.absmax, act_mean_sq=stats.mean_sq,
            criterion=config.criterion, segments=site.segments, seed=seed, rotate=candidates,
            refine=refine, weights=wfmt, acts=afmt, alpha=config.alpha, tau=config.tau,
        )
        own = _own_rows(model, calib, site, res, wfmt, afmt, guard=guard, scale=s)
        if own is None and strength is not None:
            continue  # a consumer is worse than RTN on its own rows under this scale
        if own is None:  # the site keeps no change
            res = dataclasses.replace(res, accepted=False, rotate=None)
            own = _own_rows(model, calib, site, res, wfmt, afmt)
        err = res.err_permuted if res.accepted else res.err_identity
        if best is None or err < best[0]:
            best = (err, strength, s, res, own)
    return best[1:]


def joint_search(
    model: nnx.Module, calib: Calibration, config: QuantConfig, targets: list[str],
    sites: list[permute.Site] | None = None, refine: int = 0, alphas: tuple[float, ...] = (),
    online: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, str | None], dict, dict]:
    """The joint (rotation, order) choice at every site with a quantized consumer, and the
    rotation choice (order fixed) for every target no site reads.

    Returns (scales (site -> s at a site, layer path -> s at a layer no site reads; in the
    input's channel order; permuquant_hs only), orders to absorb (site -> perm, identity
    orders left out), rotation per target path (None: none), site report, layer report). One
    rotation per site, shared by its consumers; errors on calibration rows;
    err_reference is the error of the reference (RTN for the default candidates, which start
    with None). refine: rounds of greedy swaps between groups (`permute.refine`) scored as one
    more order at every site. alphas: smoothing strengths tried at scalable sites, and with
    `online` also at the others and at layers no site reads (see permuquant_hs; where a scale
    is kept, a site row's err_identity is the error under that scale alone). sites: see
    `pqjax.methods` (None: the model's own).
    """
    wfmt, afmt = config.weight_format(), config.act_format()
    kw = dict(weights=wfmt, acts=afmt, alpha=config.alpha, tau=config.tau)
    wanted = set(targets)
    scales, perms, rotations, site_rows, layer_rows = {}, {}, {}, {}, {}
    todo = [s for s in model_sites(model, sites) if wanted.intersection(s.consumers)]
    for i, site in enumerate(todo):
        if site.consumers[0] not in calib:
            continue
        # a scale that cannot fold is applied online by the consumers: all must be quantized
        online_ok = site.scalable or (online and wanted.issuperset(site.consumers))
        alpha, s, res, own = _site_choice(model, calib, config, site, config.seed + i, refine,
                                          alphas if online_ok else ())
        if s is not None:
            scales[site.name] = s
        if res.accepted and not np.array_equal(res.perm, np.arange(site.dim)):
            perms[site.name] = res.perm
        site_rows[site.name] = {
            "kind": site.kind, "dim": site.dim, "accepted": res.accepted,
            "err_identity": res.err_identity, "err_permuted": res.err_permuted,
            "criterion": res.criterion, "alpha": res.alpha, "transform": res.rotate,
            **({"smooth_alpha": alpha} if alphas else {}),
        }
        for c, (b, a) in own.items():
            if c in wanted:
                rotations[c] = res.rotate
                layer_rows[c] = {"site": site.name, **_row(res, b, a),
                                 **({"smooth_alpha": alpha} if alphas else {})}
    for path in targets:
        if path in layer_rows or path not in calib:
            continue  # no calibration rows: no choice, the layer stays unrotated
        stats = calib[path]
        err, rtn, alpha, s, res = best_smoothed(  # no site: a scale is applied online only
            stats.rows, kernel_of(model, path), alphas if online else (),
            act_absmax=stats.absmax, criterion="identity",
            rotate=rotation_candidates(config, stats.rows.shape[1]), **kw)
        if s is not None:
            scales[path] = s
        rotations[path] = res.rotate
        layer_rows[path] = {"site": None, **_row(res, rtn, err),
                            **({"smooth_alpha": alpha} if alphas else {})}
    return scales, perms, rotations, site_rows, layer_rows


@register_method("permuquant_h", options=JOINT_OPTIONS)
def permuquant_h(
    model: nnx.Module, calib: Calibration, config: QuantConfig, targets: list[str],
    sites: list[permute.Site] | None = None,
) -> Plan:
    """The best (rotation, order) pair per site by PermuQuant's acceptance rule, absorbed and
    folded, then RTN (see the module docstring)."""
    return joint_plan(model, calib, config, targets, sites, refine=int(config.option("refine")))


@register_method("permuquant_hr", options={
    **JOINT_OPTIONS,
    "refine": Option(int, 8, "rounds of greedy swaps between groups", nonnegative=True),
})
def permuquant_hr(
    model: nnx.Module, calib: Calibration, config: QuantConfig, targets: list[str],
    sites: list[permute.Site] | None = None,
) -> Plan:
    """permuquant_h with the search beyond sorting: greedy swaps between groups from the best
    sorted order (option "refine": rounds, default 8), one more order for the joint choice."""
    return joint_plan(model, calib, config, targets, sites, refine=int(config.option("refine")))


SMOOTH_ALPHAS = (0.2, 0.35, 0.5, 0.65)


@register_method("permuquant_hs", options={
    **JOINT_OPTIONS,
    "alphas": Option((tuple, list), SMOOTH_ALPHAS, "smoothing strengths to try, in [0, 1]",
                     unit=True),
    "online": Option(bool, False, "also try scales applied online (QuantLinear.input_scale) "
                     "where none folds"),
})
def permuquant_hs(
    model: nnx.Module, calib: Calibration, config: QuantConfig, targets: list[str],
    sites: list[permute.Site] | None = None,
) -> Plan:
    """permuquant_h with a per-channel scale in the joint choice: at each scalable site,
    SmoothQuant's migration scale for each strength in option "alphas" (default 0.2..0.65),
    or none, each with its own (rotation, order) choice; the lowest calibration error whose
    consumers all stay at or below RTN is kept, then folded like SmoothQuant's."""
    alphas = tuple(float(a) for a in config.option("alphas"))
    return joint_plan(model, calib, config, targets, sites, refine=int(config.option("refine")),
                      alphas=alphas, online=bool(config.option("online")))


def joint_plan(
    model: nnx.Module, calib: Calibration, config: QuantConfig, targets: list[str],
    sites: list[permute.Site] | None, refine: int, alphas: tuple[float, ...] = (),
    online: bool = False,
) -> Plan:
    sites = model_sites(model, sites)
    scales, perms, rotations, site_rows, layer_rows = joint_search(
        model, calib, config, targets, sites, refine, alphas, online)
    scalable = {site.name for site in sites if site.scalable}
    folded = {n: s for n, s in scales.items() if n in scalable}
    absorbed = permute.absorb(absorb_scales(model, folded, site_list=sites) if folded else model,
                              perms, site_list=sites)
    rtn = rtn_errors(model, calib, config, targets)
    plan = Plan(model=absorbed, sites=site_rows, perms=perms)
    correct = bool(config.option("bias_correction"))
    for path in targets:
        name, row = rotations.get(path), layer_rows.get(path)
        site = None if row is None else row["site"] or path  # an unsited layer: its own scale
        scale, growth = scales.get(site), None
        kernel, extras = kernel_of(absorbed, path), {}
        if scale is not None and site not in folded:  # online: x / s before the quantizer
            s = jnp.asarray(scale if site not in perms else scale[perms[site]], jnp.float32)
            kernel, extras["input_scale"] = s[:, None] * kernel.astype(jnp.float32), 1.0 / s
        if name is not None:  # a rotation is only chosen on calibration rows
            kernel = rotate.fold_into_kernel(name, kernel)
            growth = amax_growth(calib, path, name, perms.get(site), scale)
            extras.update(input_transform=name, **rotated_act_amax(calib, path, growth, scale))
        if extras:  # the kernel changed (a scale or rotation folded in)
            plan.kernels[path] = kernel
        if correct and path in calib and module_at(absorbed, path).bias is not None:
            extras["bias_correction"] = layer_bias_correction(
                absorbed, calib, config, path, kernel, extras, perms.get(site),
                scale if site in folded else None)
        if extras:
            plan.extras[path] = extras
        if row is not None and path in rtn:
            plan.layers[path] = {"err_rtn": rtn[path], **row, "act_amax_growth": growth}
    return plan
