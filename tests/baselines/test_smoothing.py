"""SmoothQuant and the shared scale folding: exact in full precision, lower W4A4 error."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pqjax
from pqjax import formats, permute
from pqjax.baselines.smoothing import (
    DEFAULT_ALPHAS,
    absorb_scales,
    column_scales,
    keep_act_range,
    migration_scales,
    smoothed_error,
)
from pqjax.methods import get_method
from pqjax.models.layers import Linear
from pqjax.quantize import quantizable
from tests.baselines.conftest import plan_model
from tests.parity import assert_close_rel
from tests.permute.synthetic import outlier_layer


def layer_err(x, w, s, fmt, rank=0):
    """Relative W/A-quantized error of the layer smoothed by s (s = 1: plain RTN)."""
    s = jnp.asarray(s, jnp.float32)
    col = jnp.ones((w.shape[1],), jnp.float32)
    n, d = smoothed_error(x, s, s[:, None] * w, col, wfmt=fmt, afmt=fmt, rank=rank)
    return float(n / d)


def deployed_err(qmodel, model, calib, path):
    """Relative error of the deployed QuantLinear at `path` (it reads the original input:
    use a layer whose site is online) against the original Linear, on calibration rows."""
    q, lin = permute.module_at(qmodel, path), permute.module_at(model, path)
    x = calib[path].rows
    y = np.asarray(x @ lin.kernel[...], np.float64)
    yq = np.asarray(q(x) - q.bias[...], np.float64)
    return float(np.sum((y - yq) ** 2) / np.sum(y**2))


def best_smoothing_err(x, w, fmt, rank=0):
    a, wa = np.abs(np.asarray(x)).max(0), np.abs(np.asarray(w)).max(1)
    return min(
        layer_err(x, w, keep_act_range(migration_scales(a, wa, al), a), fmt, rank)
        for al in DEFAULT_ALPHAS
    )


@pytest.mark.parametrize("name", ["nvfp4", "int4"])
def test_smoothing_lowers_w4a4_error_on_outlier_channels(name):
    x, w, _ = outlier_layer(0, tokens=256, d_in=128, d_out=64)
    fmt = formats.get(name)
    rtn = layer_err(x, w, np.ones(128), fmt)
    assert best_smoothing_err(x, w, fmt) < 0.2 * rtn


def test_scales_keep_the_activation_range():
    a = np.array([1.0, 50.0, 0.0, 3.0], np.float32)
    s = keep_act_range(migration_scales(a, np.array([2.0, 0.1, 1.0, 1.0]), 0.5), a)
    assert np.all(np.isfinite(s)) and np.all(s > 0)
    np.testing.assert_allclose(np.max(np.maximum(a, 1e-5) / s), a.max(), rtol=1e-6)


def test_absorb_scales_is_exact_and_leaves_the_input(tiny_flux):
    model, _, data = tiny_flux
    rng = np.random.default_rng(0)
    foldable = [s for s in permute.sites(model) if s.scalable]
    assert {s.kind for s in foldable} == {"norm", "attn_out"}
    scales = {s.name: np.exp(rng.normal(0, 1, s.dim)).astype(np.float32) for s in foldable}
    ref = np.asarray(model(**data[0]))
    out = absorb_scales(model, scales)
    assert_close_rel(np.asarray(out(**data[0])), ref, 1e-5, "scales absorbed")
    np.testing.assert_array_equal(np.asarray(model(**data[0])), ref)
    site = foldable[0]
    before = np.asarray(permute.module_at(model, site.consumers[0]).kernel[...])
    after = np.asarray(permute.module_at(out, site.consumers[0]).kernel[...])
    np.testing.assert_allclose(after, before * scales[site.name][:, None], rtol=1e-6)
    online = next(s for s in permute.sites(model) if not s.scalable)
    with pytest.raises(ValueError, match="input_scale"):
        absorb_scales(model, {online.name: np.ones(online.dim, np.float32)})
    with pytest.raises(ValueError, match="> 0"):
        absorb_scales(model, {site.name: np.zeros(site.dim, np.float32)})
    # column_scales maps every folded producer back: new kernel * col == old kernel * rows
    cols = column_scales(model, permute.sites(model), scales)
    assert "transformer_blocks.0.attn.to_v" in cols and "transformer_blocks.0.norm1.linear" in cols
    row_scale = {c: scales[s.name] for s in foldable for c in s.consumers}
    for path, col in cols.items():
        old = np.asarray(permute.module_at(model, path).kernel[...])
        new = np.asarray(permute.module_at(out, path).kernel[...])
        rows = row_scale.get(path, np.ones(old.shape[0], np.float32))
        np.testing.assert_allclose(new * col, old * rows[:, None], rtol=1e-5, err_msg=path)


def test_plan_is_exact_in_full_precision(tiny_flux, plan_forward):
    model, calib, data = tiny_flux
    cfg = pqjax.QuantConfig(weights="nvfp4", acts="nvfp4", method="smoothquant")
    plan = get_method("smoothquant")(model, calib, cfg, quantizable(model, cfg))
    # folded where scalable, online (input_scale) after GELU / SiLU
    assert any("input_scale" in e for e in plan.extras.values())
    assert any(row["folded"] for row in plan.sites.values())
    assert all(row["alpha"] in DEFAULT_ALPHAS for row in plan.sites.values())
    ref = np.asarray(model(**data[1]))
    assert_close_rel(plan_forward(plan, data[1]), ref, 1e-5, "smoothquant plan")


@pytest.mark.slow
@pytest.mark.parametrize("weights,group", [("nvfp4", None), ("int4", 64)])
def test_end_to_end(tiny_flux, weights, group):
    model, calib, data = tiny_flux
    cfg = pqjax.QuantConfig(
        weights=weights, acts=weights, group=group, method="smoothquant"
    )
    qmodel, report = pqjax.quantize(model, calib, cfg)
    assert np.isfinite(np.asarray(qmodel(**data[0]))).all()
    assert len(report.layers) == len(quantizable(model, cfg))
    assert all(np.isfinite(r["err"]) and np.isfinite(r["err_rtn"]) for r in report.layers)
    assert report.summary["mean_err"] < report.summary["mean_err_rtn"]
    if weights == "int4":  # dynamic act scales: the report is what the deployed layer does
        path = "transformer_blocks.0.ff.net.2"  # after GELU: smoothed online
        row = next(r for r in report.layers if r["layer"] == path)
        assert deployed_err(qmodel, model, calib, path) == pytest.approx(row["err"], rel=1e-4)


class TwoLinears(nnx.Module):
    """A model without declared sites: every layer is smoothed online."""

    def __init__(self):
        self.a = Linear(16, 32, rngs=nnx.Rngs(0))
        self.b = Linear(32, 8, rngs=nnx.Rngs(1))

    def __call__(self, x):
        return self.b(jax.nn.gelu(self.a(x)))


def test_models_without_sites_smooth_online():
    model = TwoLinears()
    x = jax.random.normal(jax.random.key(0), (4, 8, 16)) * jnp.linspace(0.1, 10.0, 16)
    calib = pqjax.calibrate(model, [{"x": x}], n_rows=32, progress=False)
    cfg = pqjax.QuantConfig(weights="int4", acts="int4", group=16)
    plan = get_method("smoothquant")(model, calib, cfg, ["a", "b"])
    assert set(plan.extras) == {"a", "b"} and not plan.sites["a:in"]["folded"]
    assert_close_rel(np.asarray(plan_model(plan)(x)), np.asarray(model(x)), 1e-5, "online")
