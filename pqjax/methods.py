"""Quantization methods: plain functions from (model or block, calibration, config, targets,
sites) to a Plan, registered with their typed options.

A method transforms the full-precision model (or one block of it: `pqjax.engine` calls every
method block by block, then once for the layers and sites that span blocks) into an equivalent
one (permutations absorbed, smoothing folded, rotations applied) and may give per-layer
replacements (pre-rounded weights, low-rank branches, online input transforms).
`pqjax.quantize.apply_plan` turns any Plan into QuantLinears the same way, so every method runs
through the same engine.

    @register_method("my_method", options={"steps": Option(int, 100, "optimiser steps",
                                                           positive=True)})
    def my_method(model, calib, config, targets, sites=None) -> Plan: ...

`sites` are the permutation sites of `model` (paths relative to it); None means the model's
own (`permute.sites(model)`), for a call on a whole model. A method takes its options with
`config.option(name)`; `QuantConfig` refuses an option the method does not declare, or a
value of the wrong type, when it is built.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from flax import nnx

from pqjax import formats, permute
from pqjax.calibrate import Calibration
from pqjax.models.paths import module_at

if TYPE_CHECKING:
    from pqjax.quantize import QuantConfig


@dataclasses.dataclass
class Plan:
    """What a method decided. `model` computes the same function as the input model.

    kernels: Linear path -> replacement `(d_in, d_out)` kernel to quantize instead (e.g. with
    learned clipping folded in, or a residual after a low-rank branch).
    qweights: Linear path -> ready QTensor `(d_out, d_in)` (e.g. GPTQ-rounded).
    extras: Linear path -> {"input_scale": (d_in,), "low_rank": (down (d_in, r), up (r, d_out)),
    "input_transform": name} for the QuantLinear (see `pqjax.layers.QuantLinear`), and
    "act_amax": the calibrated absmax of what the activation quantizer reads, where the method
    changes it beyond a range-keeping scale (a rotation: `max |x T|`); the static NVFP4
    activation global scale is derived from it (default: the calibrated input's absmax), and
    "bias_correction": `(d_out,)` subtracted from the quantized layer's bias (its mean output
    error on calibration rows; `pqjax.baselines.bias_correction`), not part of `model`.
    layers: Linear path -> report fields (err_rtn, err, accepted, criterion, site, ...).
    sites: site name -> report fields. perms: site name -> the absorbed order `(dim,)`.
    """

    model: nnx.Module
    kernels: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
    qweights: dict[str, formats.QTensor] = dataclasses.field(default_factory=dict)
    extras: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    layers: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    sites: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    perms: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class Option:
    """One option a method takes: its type(s), default and meaning.

    types: a type or tuple of types the value must be (bool is never an int here);
    positive: a number must be > 0 (`nonnegative`: >= 0); unit: every number in a sequence
    value lies in [0, 1]; choices: the allowed values. Numbers must be finite.
    """

    types: type | tuple[type, ...]
    default: Any
    doc: str
    positive: bool = False
    nonnegative: bool = False
    unit: bool = False
    choices: tuple[Any, ...] = ()

    def problem(self, value: Any) -> str | None:
        """Why `value` is not valid (None when it is)."""
        types = self.types if isinstance(self.types, tuple) else (self.types,)
        want = "|".join("None" if t is type(None) else t.__name__ for t in types)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            return f"is not a valid {want}"
        if _is_number(value):
            if not math.isfinite(value):
                return "must be finite"
            if self.positive and not value > 0:
                return "must be > 0"
            if self.nonnegative and not value >= 0:
                return "must be >= 0"
        if self.unit and not (
            len(value) > 0 and all(_is_number(a) and 0 <= a <= 1 for a in value)
        ):
            return f"is not a valid {want} (values in [0, 1])"
        if self.choices and value not in self.choices:
            return f"must be one of {list(self.choices)}"
        return None


Method = Callable[..., Plan]


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A registered method: its function, its options, and a check of the config's formats
    (`check(config)` raises ValueError) run when a QuantConfig naming it is built."""

    name: str
    fn: Method
    options: Mapping[str, Option]
    check: Callable[[QuantConfig], None] | None = None

    def __call__(self, model: nnx.Module, calib: Calibration, config: QuantConfig,
                 targets: list[str], sites: list[permute.Site] | None = None) -> Plan:
        return self.fn(model, calib, config, targets, sites)

    def check_options(self, options: Sequence[Any]) -> None:
        """Refuse pairs that are malformed, repeated, unknown to this method or ill-typed."""
        if not isinstance(options, tuple | list):
            raise ValueError(f"QuantConfig.options must be (name, value) pairs, got {options!r}")
        seen = set()
        for pair in options:
            if not (isinstance(pair, tuple | list) and len(pair) == 2
                    and isinstance(pair[0], str)):
                raise ValueError(f"QuantConfig.options: {pair!r} is not a (name, value) pair")
            name, value = pair
            if name in seen:
                raise ValueError(f"QuantConfig.options: {name!r} is given twice")
            seen.add(name)
            if name not in self.options:
                takes = sorted(self.options) or "no options"
                raise ValueError(f"QuantConfig.options: unknown option {name!r} for method "
                                 f"{self.name!r}; it takes {takes}")
            why = self.options[name].problem(value)
            if why:
                raise ValueError(f"QuantConfig.options: {name}={value!r} {why} "
                                 f"({self.options[name].doc})")


_METHODS: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    *,
    options: Mapping[str, Option] | None = None,
    check: Callable[[QuantConfig], None] | None = None,
) -> Callable[[Method], Method]:
    """Decorator: register `fn(model, calib, config, targets, sites=None) -> Plan` as `name`,
    taking `options` (name -> Option) and checking the config with `check`."""

    def add(fn: Method) -> Method:
        _METHODS[name] = MethodSpec(name, fn, dict(options or {}), check)
        return fn

    return add


def method_spec(name: str) -> MethodSpec:
    """The registered method `name`; ValueError listing the known ones otherwise."""
    if name not in _METHODS:
        import pqjax.baselines  # noqa: F401  (registers the baselines)
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {method_names()}")
    return _METHODS[name]


def get_method(name: str) -> MethodSpec:
    """The method `name`, callable as `method(model, calib, config, targets, sites=None)`."""
    return method_spec(name)


def method_names() -> list[str]:
    import pqjax.baselines  # noqa: F401

    return sorted(_METHODS)


def model_sites(model: nnx.Module, sites: list[permute.Site] | None) -> list[permute.Site]:
    """`sites` as given (a block's, re-rooted by the engine), else the model's own."""
    return permute.sites(model) if sites is None else list(sites)


def kernel_of(model: nnx.Module, path: str) -> jax.Array:
    return module_at(model, path).kernel[...]


def rtn_errors(
    model: nnx.Module, calib: Calibration, config: QuantConfig, paths: list[str]
) -> dict[str, float]:
    """Per-layer relative error of plain round-to-nearest on the calibration rows."""
    wfmt, afmt = config.weight_format(), config.act_format()
    out = {}
    for path in paths:
        if path in calib:
            d = calib[path].rows.shape[1]
            out[path] = permute.layer_errors(
                calib[path].rows, [kernel_of(model, path)], np.arange(d), wfmt, afmt
            )[0]
    return out


@register_method("rtn")
def rtn(model: nnx.Module, calib: Calibration, config: QuantConfig, targets: list[str],
        sites: list[permute.Site] | None = None) -> Plan:
    """Round-to-nearest per group: the reference point."""
    errs = rtn_errors(model, calib, config, targets)
    layers = {p: {"err_rtn": e, "err": e} for p, e in errs.items()}
    return Plan(model=nnx.clone(model), layers=layers)


def search_sites(
    model: nnx.Module,
    calib: Calibration,
    config: QuantConfig,
    targets: list[str],
    sites: list[permute.Site] | None = None,
    *,
    rotate_for: Callable[[permute.Site], str | None] | None = None,
    baseline_key: str = "err_rtn",
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """PermuQuant's search at every site with a quantized consumer.

    Returns (perms, site report, layer report); layer errors are on each layer's own
    calibration rows (see `_own_row_errors`) with the accepted order (identity when
    rejected), so err <= the identity's error (under `baseline_key`) by construction.
    sites: the sites to search (default: all of `model`'s). rotate_for: a site's online
    input transform (`pqjax.rotate` name), applied after the permutation in every error
    evaluation and recorded as "transform".
    """
    wfmt, afmt = config.weight_format(), config.act_format()
    wanted = set(targets)
    perms, site_rows, layer_rows = {}, {}, {}
    todo = [s for s in model_sites(model, sites) if wanted.intersection(s.consumers)]
    for i, site in enumerate(todo):
        stats = calib.get(site.consumers[0])
        if stats is None:
            continue
        kernels = [kernel_of(model, c) for c in site.consumers]
        name = None if rotate_for is None else rotate_for(site)
        res = permute.search(
            stats.rows,
            kernels,
            weights=wfmt,
            acts=afmt,
            criterion=config.criterion,
            alpha=config.alpha,
            tau=config.tau,
            segments=site.segments,
            act_mean_sq=stats.mean_sq,
            act_absmax=stats.absmax,
            seed=config.seed + i,
            rotate=name,
        )
        own = _own_row_errors(model, calib, site, res, config, wfmt, afmt, name)
        if own is None:
            continue
        accepted, e_id, e_perm, err_id, err_perm = own
        perms[site.name] = res.candidate_perm if accepted else site.identity()
        transform = {} if name is None else {"transform": name}
        site_rows[site.name] = {
            "kind": site.kind,
            "dim": site.dim,
            "accepted": accepted,
            "err_identity": e_id,
            "err_permuted": e_perm,
            "criterion": res.criterion,
            "alpha": res.alpha,
            **transform,
        }
        for c in site.consumers:
            if c not in wanted or c not in err_id:
                continue
            layer_rows[c] = {
                "site": site.name,
                baseline_key: err_id[c],
                "err": err_perm[c] if accepted else err_id[c],
                "accepted": accepted,
                "criterion": res.criterion if accepted else "identity",
                "alpha": res.alpha,
                **transform,
            }
    return perms, site_rows, layer_rows


def _own_row_errors(
    model: nnx.Module,
    calib: Calibration,
    site: permute.Site,
    res: permute.SearchResult,
    config: QuantConfig,
    wfmt: formats.Format | None,
    afmt: formats.Format | None,
    rotate: str | None,
) -> tuple[bool, float, float, dict[str, float], dict[str, float]] | None:
    """Score each consumer of `site` on its OWN calibration rows, identity and searched order.

    The search reads the first consumer's rows; consumers that read another tensor (FLUX's
    `to_add_out` reads the text part of the attention output, `to_out.0` the image part) are
    scored here on theirs, with the same function as `rtn_errors`, so a layer's RTN error is
    the same number in every method's report. The order is kept only if no consumer's own
    error grows; where the consumers' rows differ, the site's gain is also taken on own rows.
    Returns (accepted, E_identity, E_permuted, per-layer identity, per-layer permuted errors).
    """
    own = [c for c in site.consumers if c in calib]
    if not own:
        return None
    ident = np.arange(site.dim)
    err_id, err_perm = {}, {}
    for c in own:
        rows, kernel = calib[c].rows, kernel_of(model, c)
        err_id[c] = permute.layer_errors(rows, [kernel], ident, wfmt, afmt, rotate)[0]
        err_perm[c] = permute.layer_errors(
            rows, [kernel], res.candidate_perm, wfmt, afmt, rotate
        )[0]
    first = np.asarray(calib[own[0]].rows)  # search_sites searched on the first consumer's
    shared = own[0] == site.consumers[0] and all(
        np.array_equal(np.asarray(calib[c].rows), first) for c in own
    )
    no_worse = all(err_perm[c] <= err_id[c] for c in own)
    if shared:
        return res.accepted and no_worse, res.err_identity, res.err_permuted, err_id, err_perm
    den = {}  # output energy ||x W||^2 per consumer, to weigh its relative error
    for c in own:
        y = np.asarray(calib[c].rows, np.float64) @ np.asarray(kernel_of(model, c), np.float64)
        den[c] = float(np.sum(y * y))
    total = max(sum(den.values()), 1e-30)
    e_id = sum(err_id[c] * den[c] for c in own) / total
    e_perm = sum(err_perm[c] * den[c] for c in own) / total
    accepted = no_worse and e_id > 0 and (e_id - e_perm) / e_id > config.tau
    return accepted, e_id, e_perm, err_id, err_perm


@register_method("permuquant")
def permuquant(
    model: nnx.Module, calib: Calibration, config: QuantConfig, targets: list[str],
    sites: list[permute.Site] | None = None,
) -> Plan:
    """Sort channels by the criterion per site, keep orders that lower the error, absorb them."""
    sites = model_sites(model, sites)
    perms, site_rows, layer_rows = search_sites(model, calib, config, targets, sites)
    for path, err in rtn_errors(
        model, calib, config, [t for t in targets if t not in layer_rows]
    ).items():
        layer_rows[path] = {"err_rtn": err, "err": err, "accepted": False, "site": None}
    accepted = {k: v for k, v in perms.items() if site_rows[k]["accepted"]}
    return Plan(
        model=permute.absorb(model, accepted, site_list=sites), layers=layer_rows,
        sites=site_rows, perms=accepted,
    )
