"""GPTQ: bit-valid QTensors, RTN when inputs are uncorrelated, lower error when they are."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import pqjax
from pqjax import formats, permute
from pqjax.baselines.gptq import gptq_layer, output_error
from pqjax.methods import get_method
from pqjax.quantize import quantizable
from tests.parity import assert_close_rel

FORMATS = [("nvfp4", {}), ("mxfp4", {}), ("int4", {"group": 32}), ("int3_asym", {"group": 16})]


def correlated_layer(seed: int = 0, n: int = 256, d_in: int = 128, d_out: int = 64):
    """x with strongly correlated channels (a shared random mixing), Gaussian w."""
    rng = np.random.default_rng(seed)
    mix = 0.3 * np.eye(d_in) + rng.standard_normal((d_in, d_in)) / np.sqrt(d_in)
    x = rng.standard_normal((n, d_in)) @ mix
    w = rng.standard_normal((d_in, d_out))
    return jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)


@pytest.mark.parametrize("name,kw", FORMATS)
def test_qtensor_is_bit_valid_and_rtn_without_correlation(name, kw):
    fmt = formats.get(name, **kw)
    _, w = correlated_layer(d_in=72)  # 72: a padded last group for g = 16, 32
    # H = 2I + damping: nothing to compensate, so GPTQ is RTN bit for bit
    qt, q = gptq_layer(jnp.eye(72), w, fmt)
    ref = fmt.quantize(w.T)
    for a, b in zip(qt.leaves(), ref.leaves()):
        assert a.dtype == b.dtype and a.shape == b.shape
        bits = [np.atleast_1d(np.asarray(t)).view(np.uint8) for t in (a, b)]
        np.testing.assert_array_equal(*bits)
    # on correlated inputs the codes change, and dequantize() is exactly the rounded weight
    x, w = correlated_layer(d_in=72)
    qt, q = gptq_layer(x, w, fmt)
    assert qt.shape == (64, 72) and q.shape == (64, 72)
    np.testing.assert_array_equal(np.asarray(qt.dequantize()), np.asarray(q))
    assert not np.array_equal(np.asarray(q), np.asarray(ref.dequantize()))


@pytest.mark.parametrize("name", ["int4", "int3", "nvfp4"])
def test_lower_weight_only_error_on_correlated_inputs(name):
    x, w = correlated_layer()
    fmt = formats.get(name)
    _, q = gptq_layer(x, w, fmt)
    gptq = float(output_error(x, w, q, afmt=None))
    rtn = float(output_error(x, w, fmt.fake_quant(w.T), afmt=None))
    assert gptq < 0.6 * rtn  # the optimal-brain-quantizer compensation, about 2x here


def test_plans_are_exact_in_full_precision(tiny_flux):
    model, calib, data = tiny_flux
    cfg = pqjax.QuantConfig(method="permuquant_gptq")
    targets = quantizable(model, cfg)
    ref = np.asarray(model(**data[1]))
    plan = get_method("permuquant_gptq")(model, calib, cfg, targets)
    assert plan.perms and set(plan.qweights) == set(targets)
    assert_close_rel(np.asarray(plan.model(**data[1])), ref, 1e-5, "permuted model")
    plan = get_method("gptq")(model, calib, cfg, targets)
    assert not plan.perms
    np.testing.assert_array_equal(np.asarray(plan.model(**data[1])), ref)
    for path, qt in plan.qweights.items():
        lin = permute.module_at(model, path)
        assert qt.shape == (lin.out_features, lin.in_features)
        assert plan.layers[path]["err"] < plan.layers[path]["err_rtn"]


# Each method and each format end to end once: the GPTQ update is format-generic (every
# format is checked layer by layer above), so the full method x format product ran the same
# code twice over at twice the cost.
@pytest.mark.slow
@pytest.mark.parametrize(
    "method,weights,group", [("gptq", "int4", 64), ("permuquant_gptq", "nvfp4", None)]
)
def test_end_to_end(tiny_flux, method, weights, group):
    model, calib, data = tiny_flux
    cfg = pqjax.QuantConfig(
        weights=weights, acts=weights, group=group, method=method
    )
    qmodel, report = pqjax.quantize(model, calib, cfg)
    assert np.isfinite(np.asarray(qmodel(**data[0]))).all()
    assert len(report.layers) == len(quantizable(model, cfg))
    assert report.summary["mean_err"] < report.summary["mean_err_rtn"]
    # the deployed weights are the GPTQ codes (not a re-rounding of the float kernel)
    plan = get_method(method)(model, calib, cfg, quantizable(model, cfg))
    q = permute.module_at(qmodel, "transformer_blocks.0.attn.to_q")
    np.testing.assert_array_equal(
        np.asarray(q.weight().dequantize()),
        np.asarray(plan.qweights["transformer_blocks.0.attn.to_q"].dequantize()),
    )
