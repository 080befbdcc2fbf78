"""OmniQuant LWC: learned per-group clipping lowers weight-only error; RTN of the clipped
kernel is what gets deployed."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import pqjax
from pqjax import formats, permute
from pqjax.baselines.omniquant import lwc_layer
from pqjax.methods import get_method
from pqjax.quantize import quantizable
from tests.parity import assert_close_rel
from tests.permute.synthetic import outlier_layer


def heavy_tailed_layer(seed: int = 1):
    """Outlier-channel activations and Student-t weights (a few large weights per group)."""
    x, _, _ = outlier_layer(seed, tokens=256, d_in=128, d_out=64)
    w = np.random.default_rng(seed).standard_t(3, (128, 64)) * 0.1
    return x, jnp.asarray(w, jnp.float32)


def rtn_err(x, w, fmt, kernel=None):
    """||x w - x RTN(kernel)||^2 / ||x w||^2 (weight-only)."""
    k = w if kernel is None else kernel
    wq = fmt.fake_quant(jnp.asarray(k).T, dtype=jnp.float32).T
    y = np.asarray(x @ w, np.float64)
    return float(np.sum((y - np.asarray(x @ wq)) ** 2) / np.sum(y**2))


@pytest.mark.parametrize("name", ["int4", "int3", "nvfp4"])
def test_learned_clipping_lowers_weight_only_error(name):
    x, w = heavy_tailed_layer()
    fmt = formats.get(name)
    kernel, info = lwc_layer(x, w, fmt, None, steps=150)
    assert not info["fallback"] and info["gamma_min"] < 0.95
    rtn = rtn_err(x, w, fmt)
    # the reported error is plain RTN of the clipped kernel, against the unclipped layer
    assert info["err"] == pytest.approx(rtn_err(x, w, fmt, kernel), rel=1e-4)
    assert info["err"] < 0.9 * rtn
    # clipping only shrinks: per group, |kernel| <= |w| and the group absmax can only drop
    assert np.all(np.abs(np.asarray(kernel)) <= np.abs(np.asarray(w)) + 1e-7)


def test_falls_back_to_rtn_when_clipping_hurts():
    x, w = heavy_tailed_layer()
    kernel, info = lwc_layer(x, w, formats.get("int4"), None, steps=0, init=-4.0)  # gamma ~ 0.02
    assert info["fallback"] and kernel is w


def test_plan_model_is_exact_and_kernels_are_clipped(tiny_flux):
    model, calib, data = tiny_flux
    cfg = pqjax.QuantConfig(
        weights="int4",
        acts="int4",
        group=64,
        method="omniquant_lwc",
        options=(("steps", 30),),
    )
    targets = quantizable(model, cfg)
    plan = get_method("omniquant_lwc")(model, calib, cfg, targets)
    # nothing but the weights to quantize changes: the model itself is the original function
    assert_close_rel(np.asarray(plan.model(**data[1])), np.asarray(model(**data[1])), 1e-6, "lwc")
    assert plan.kernels and not plan.extras
    for path, k in plan.kernels.items():
        w = np.asarray(permute.module_at(model, path).kernel[...])
        assert np.all(np.abs(np.asarray(k)) <= np.abs(w) + 1e-7)
    assert all(r["err"] <= r["err_rtn"] for r in plan.layers.values())


@pytest.mark.slow
@pytest.mark.parametrize("weights,group", [("nvfp4", None), ("int4", 64)])
def test_end_to_end(tiny_flux, weights, group):
    model, calib, data = tiny_flux
    cfg = pqjax.QuantConfig(
        weights=weights,
        acts=weights,
        group=group,
        method="omniquant_lwc",
        options=(("steps", 30),),
    )
    qmodel, report = pqjax.quantize(model, calib, cfg)
    assert np.isfinite(np.asarray(qmodel(**data[0]))).all()
    assert len(report.layers) == len(quantizable(model, cfg))
    assert report.summary["layers_not_worse_than_rtn"] == len(report.layers)
