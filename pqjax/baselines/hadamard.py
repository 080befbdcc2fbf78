"""Rotation baselines: `hadamard` (QuaRot-style) and `permuquant_h` (permutation, then rotation).

hadamard: every quantized Linear gets the block Hadamard T = "hadamard:<b>" of its input
channels, b = the quantization group (`pqjax.rotate.block_for`; QuantConfig option "block"
overrides, "seed" adds random signs). T is folded offline into the kernel (T^T W, Plan.kernels)
and applied online to the activations (QuantLinear.input_transform), then RTN per group.
Full-precision output is unchanged; the quantizers see each group's energy spread over the
group, which flattens outlier channels.

permuquant_h: PermuQuant's search at every site, with the rotation inside each group applied
in BOTH orders the acceptance rule compares (`permute.search(..., rotate=name)`): the identity
order is exactly `hadamard`, so every layer is at least as good as `hadamard` alone on the
calibration rows, by construction. Accepted orders are absorbed (`permute.absorb`), then the
rotation is folded into the permuted kernels. Rotation is per consumer input, independent of
sites: consumers outside every site (or without calibration rows) get the rotation alone.

Report rows: err_rtn (plain RTN, no rotation), err_hadamard (rotation, identity order), err
(what the method deploys, on calibration rows), transform (the name), act_amax_growth. The
rotation carries no guarantee against RTN: err may exceed err_rtn (NVFP4 in particular).

NVFP4 caveat: `pqjax.quantize` derives the static activation global scale from the calibration
absmax of the UNROTATED input; a rotated block can exceed it by up to sqrt(b) (Sylvester on a
constant block), and E4M3 block scales then saturate at run time. act_amax_growth = max |x T| /
max |x| on the calibration rows shows where (> 1). The errors reported here use the dynamic
per-tensor scale of the rotated rows, like `rtn_errors` does for RTN.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pqjax import permute, rotate
from pqjax.calibrate import Calibration
from pqjax.methods import Plan, kernel_of, register_method, rtn_errors, search_sites

if TYPE_CHECKING:
    from pqjax.quantize import QuantConfig


def transform_for(config: QuantConfig, d_in: int, kind: str) -> str:
    """The transform name of a layer with d_in inputs: block from the format's group (the
    finest of weights / acts), or QuantConfig option "block"; option "seed" adds signs."""
    groups = [f.group_size for f in (config.weight_format(), config.act_format()) if f]
    group = min((g for g in groups if g), default=None)
    block = rotate.block_for(group, d_in, kind, config.option("block"))
    return rotate.transform_name(kind, block, config.option("seed"))


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


def amax_growth(calib: Calibration, path: str, name: str, perm: Any = None) -> float | None:
    """How much the rotation raises the activation absmax on the calibration rows (after the
    site's absorbed order `perm`, if any); None without rows."""
    if path not in calib:
        return None
    rows = calib[path].rows
    return float(_amax_growth(name, rows if perm is None else rows[:, perm]))


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
            plan.layers[path] = {
                "err_rtn": rtn[path],
                "err": err,
                "transform": name,
                "act_amax_growth": amax_growth(calib, path, name),
            }
    return plan


@register_method("hadamard")
def hadamard(
    model: nnx.Module, calib: Calibration, config: QuantConfig, targets: list[str]
) -> Plan:
    """Block Hadamard of each group folded into the weights and applied online, then RTN."""
    return rotation_plan(model, calib, config, targets, "hadamard")


def search_sites_rotated(
    model: nnx.Module, calib: Calibration, config: QuantConfig, targets: list[str], kind: str
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """`methods.search_sites` with the in-group rotation in every error evaluation.

    Returns (accepted orders, site report, layer report); layer err is the rotated error under
    the accepted order, err_hadamard the rotated error under the identity.
    """
    perms, site_rows, layer_rows = search_sites(
        model,
        calib,
        config,
        targets,
        desc="permute+rotate",
        rotate_for=lambda site: transform_for(config, site.dim, kind),
        baseline_key="err_hadamard",
    )
    accepted = {k: v for k, v in perms.items() if site_rows[k]["accepted"]}
    return accepted, site_rows, layer_rows


@register_method("permuquant_h")
def permuquant_h(
    model: nnx.Module, calib: Calibration, config: QuantConfig, targets: list[str]
) -> Plan:
    """PermuQuant's accepted orders, then the block Hadamard inside each group, then RTN."""
    perms, site_rows, layer_rows = search_sites_rotated(model, calib, config, targets, "hadamard")
    absorbed = permute.absorb(model, perms)
    rtn = rtn_errors(model, calib, config, targets)
    plan = Plan(model=absorbed, sites=site_rows, perms=perms)
    for path in targets:
        kernel = kernel_of(absorbed, path)
        name = transform_for(config, kernel.shape[0], "hadamard")
        plan.kernels[path] = rotate.fold_into_kernel(name, kernel)
        plan.extras[path] = {"input_transform": name}
        row = layer_rows.get(path)
        if row is None:  # no site reads it: the rotation alone
            err = rotated_error(calib, config, path, kernel, name)
            if err is None:
                continue
            row = {"site": None, "err_hadamard": err, "err": err, "accepted": False}
            row["transform"] = name
        if path in rtn:
            growth = amax_growth(calib, path, name, perms.get(row["site"]))
            plan.layers[path] = {"err_rtn": rtn[path], **row, "act_amax_growth": growth}
    return plan
