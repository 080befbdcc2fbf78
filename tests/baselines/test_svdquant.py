"""SVDQuant: low-rank branch + quantized residual is exact in full precision and beats
smoothing alone on outlier channels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pqjax
from pqjax import formats
from pqjax.baselines.smoothing import low_rank_split
from pqjax.methods import get_method
from pqjax.quantize import quantizable
from tests.baselines.test_smoothing import best_smoothing_err, deployed_err, layer_err
from tests.parity import assert_close_rel
from tests.permute.synthetic import outlier_layer


def test_low_rank_split_is_the_top_singular_part():
    k = jax.random.normal(jax.random.key(0), (48, 24))
    down, up = low_rank_split(k, 8)
    assert down.shape == (48, 8) and up.shape == (8, 24)
    sv = np.linalg.svd(np.asarray(k), compute_uv=False)
    resid = np.linalg.svd(np.asarray(k - down @ up), compute_uv=False)
    np.testing.assert_allclose(resid[:16], sv[8:], rtol=1e-4)  # the rest of the spectrum


@pytest.mark.parametrize("name", ["nvfp4", "int4"])
def test_low_rank_branch_lowers_w4a4_error_below_smoothing(name):
    x, w, _ = outlier_layer(0, tokens=256, d_in=128, d_out=64)
    fmt = formats.get(name)
    rtn = layer_err(x, w, np.ones(128), fmt)
    smooth = best_smoothing_err(x, w, fmt)
    svd = best_smoothing_err(x, w, fmt, rank=16)
    assert svd < 0.7 * smooth < 0.7 * rtn


def test_plan_is_exact_in_full_precision(tiny_flux, plan_forward):
    model, calib, data = tiny_flux
    cfg = pqjax.QuantConfig(method="svdquant")  # rank 32 by default
    targets = quantizable(model, cfg)
    plan = get_method("svdquant")(model, calib, cfg, targets)
    for path in targets:
        down, up = plan.extras[path]["low_rank"]
        kernel = plan.kernels[path]
        assert down.shape == (kernel.shape[0], 32) and up.shape == (32, kernel.shape[1])
        assert plan.layers[path]["rank"] == 32
    # the residual plus the branch is the smoothed kernel (online scale where not foldable)
    online = [p for p in targets if "input_scale" in plan.extras[p]]
    assert online and len(online) < len(targets)
    assert_close_rel(plan_forward(plan, data[1]), np.asarray(model(**data[1])), 1e-5, "svdquant")


@pytest.mark.slow
@pytest.mark.parametrize("weights,group", [("nvfp4", None), ("int4", 64)])
def test_end_to_end(tiny_flux, weights, group):
    model, calib, data = tiny_flux
    cfg = pqjax.QuantConfig(
        weights=weights, acts=weights, group=group, method="svdquant"
    )
    qmodel, report = pqjax.quantize(model, calib, cfg)
    assert np.isfinite(np.asarray(qmodel(**data[0]))).all()
    assert len(report.layers) == len(quantizable(model, cfg))
    assert report.summary["mean_err"] < report.summary["mean_err_rtn"]
    q = pqjax.permute.module_at(qmodel, "transformer_blocks.0.ff.net.2")
    assert q.low_rank_down[...].shape == (q.in_features, 32)
    assert jnp.all(jnp.isfinite(q.input_scale[...]))  # after GELU: online
    if weights == "int4":  # dynamic act scales: the report is what the deployed layer does
        row = next(r for r in report.layers if r["layer"] == "transformer_blocks.0.ff.net.2")
        err = deployed_err(qmodel, model, calib, "transformer_blocks.0.ff.net.2")
        assert err == pytest.approx(row["err"], rel=1e-4)
