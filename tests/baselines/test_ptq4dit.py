"""PTQ4DiT: Spearman-weighted timestep salience, CSB balancing, exact folding."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import pqjax
from pqjax import formats
from pqjax.baselines.ptq4dit import csb_scales, spearman, ssc_candidates, timestep_weights
from pqjax.baselines.smoothing import keep_act_range
from pqjax.calibrate import LayerStats
from pqjax.methods import get_method
from pqjax.permute.sites import Site
from pqjax.quantize import quantizable
from tests.baselines.test_smoothing import layer_err
from tests.parity import assert_close_rel
from tests.permute.synthetic import outlier_layer


def test_spearman_matches_scipy_with_ties():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, 40).astype(float)  # many ties
    b = rng.normal(size=40)
    assert spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a, b).statistic, abs=1e-12)
    assert spearman(b, b) == pytest.approx(1.0)
    assert spearman(np.ones(5), b[:5]) == 0.0


def test_complementary_timesteps_weigh_more():
    w = np.linspace(1.0, 2.0, 16)
    steps = np.stack([w, w[::-1], np.roll(w, 5)])  # rho = 1, -1, in between
    rho, eta = timestep_weights(steps, w)
    assert rho[0] == pytest.approx(1.0) and rho[1] == pytest.approx(-1.0)
    assert eta.sum() == pytest.approx(1.0) and eta[1] > eta[2] > eta[0]
    np.testing.assert_allclose(eta / eta[0], np.exp(rho[0] - rho), rtol=1e-12)


def _stats(absmax, batch_absmax=None):
    d = len(absmax)
    return LayerStats(
        mean_sq=np.ones(d), absmax=absmax, count=1, rows=np.ones((1, d)), batch_absmax=batch_absmax
    )


def test_salience_calibration_and_its_fallback():
    rng = np.random.default_rng(1)
    steps = rng.uniform(0.5, 4.0, (4, 8))
    w = rng.uniform(0.1, 1.0, 8)
    site = Site("s", 8, consumers=("a",))
    [(info, s)] = ssc_candidates(site, steps.max(0), w, [_stats(steps.max(0), steps)])
    _, eta = timestep_weights(steps, w)
    assert info["ssc"] == "spearman" and info["timesteps"] == 4
    np.testing.assert_allclose(s, np.sqrt((eta @ steps) / w), rtol=1e-6)
    # identical timesteps: the calibrated salience is the aggregate one
    same = np.repeat(steps[:1], 3, axis=0)
    [(_, s_same)] = ssc_candidates(site, steps[0], w, [_stats(steps[0], same)])
    np.testing.assert_allclose(s_same, csb_scales(steps[0], w), rtol=1e-6)
    [(info, s_agg)] = ssc_candidates(site, steps.max(0), w, [_stats(steps.max(0))])
    assert info == {"ssc": "aggregate"}
    np.testing.assert_allclose(s_agg, np.sqrt(steps.max(0) / w), rtol=1e-6)


@pytest.mark.parametrize("name", ["nvfp4", "int4"])
def test_balancing_lowers_w4a4_error_on_outlier_channels(name):
    x, w, _ = outlier_layer(0, tokens=256, d_in=128, d_out=64)
    fmt = formats.get(name)
    a, wa = np.abs(np.asarray(x)).max(0), np.abs(np.asarray(w)).max(1)
    rtn = layer_err(x, w, np.ones(128), fmt)
    assert layer_err(x, w, keep_act_range(csb_scales(a, wa), a), fmt) < 0.2 * rtn


def test_plan_is_exact_in_full_precision(tiny_flux, plan_forward):
    model, calib, data = tiny_flux
    cfg = pqjax.QuantConfig(method="ptq4dit")
    targets = quantizable(model, cfg)
    plan = get_method("ptq4dit")(model, calib, cfg, targets)
    assert all(r["ssc"] == "spearman" and r["timesteps"] == 3 for r in plan.sites.values())
    assert all(sum(r["eta"]) == pytest.approx(1.0) for r in plan.sites.values())
    assert_close_rel(plan_forward(plan, data[1]), np.asarray(model(**data[1])), 1e-5, "ptq4dit")
    # without per-timestep statistics it balances the aggregate salience, and says so
    flat = {k: dataclasses.replace(v, batch_absmax=None) for k, v in calib.items()}
    plan = get_method("ptq4dit")(model, flat, cfg, targets)
    assert {r["ssc"] for r in plan.layers.values()} == {"aggregate"}


@pytest.mark.slow
@pytest.mark.parametrize("weights,group", [("nvfp4", None), ("int4", 64)])
def test_end_to_end(tiny_flux, weights, group):
    model, calib, data = tiny_flux
    cfg = pqjax.QuantConfig(
        weights=weights, acts=weights, group=group, method="ptq4dit"
    )
    qmodel, report = pqjax.quantize(model, calib, cfg)
    assert np.isfinite(np.asarray(qmodel(**data[0]))).all()
    assert len(report.layers) == len(quantizable(model, cfg))
    assert all(np.isfinite(r["err"]) and r["ssc"] == "spearman" for r in report.layers)
