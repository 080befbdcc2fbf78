"""The joint methods' bias correction: each deployed layer's mean output error on its
calibration rows is zero after it, in the layer's own (absorbed, scaled, rotated) input."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

import pqjax
from pqjax.methods import get_method
from pqjax.models.paths import module_at
from pqjax.quantize import apply_plan, quantizable
from tests.baselines.rotation_helpers import tiny_flux


@pytest.mark.parametrize("method, options", [
    ("permuquant_h", {}),                                    # orders absorbed, rotations
    ("permuquant_hs", {"online": True}),                     # folded and online scales too
])
def test_corrected_layers_have_no_mean_error_on_their_rows(method, options):
    """Checked on the QuantLinears that pqjax.quantize deploys, against the plan's own
    full-precision model recalibrated on the same data and seed (the same sampled rows, in
    the order and scale the layer reads them). Before the correction the mean error is the
    correction itself; after it, <= 1e-2 of it: this eager call and the correction's jitted
    one may round an input an ulp apart, and an FP4 code at a rounding boundary then flips (one
    flip moves the 96-row mean by a grid step / 96; measured here up to 1.5e-3 of it), while an
    input in the wrong order or scale leaves an error of the correction's own size."""
    model, calib, data = tiny_flux()
    cfg = pqjax.QuantConfig(method=method, weights="nvfp4", acts="nvfp4",
                            options=tuple(options.items()))
    targets = quantizable(model, cfg)
    plan = get_method(method)(model, calib, cfg, targets)
    corrected = {p: e["bias_correction"] for p, e in plan.extras.items()
                 if "bias_correction" in e}
    assert set(corrected) == set(targets)  # every tiny FLUX Linear has a bias and rows
    fp = nnx.clone(plan.model)  # apply_plan swaps the plan model's Linears in place
    rows = pqjax.calibrate(fp, data, n_rows=96, progress=False)
    qmodel = apply_plan(plan, calib, cfg, targets)
    if method == "permuquant_hs":
        assert any("input_scale" in plan.extras[p] for p in targets)
    for path, delta in corrected.items():
        x = rows[path].rows
        err = np.asarray(module_at(qmodel, path)(x), np.float64) - np.asarray(
            module_at(fp, path)(x), np.float64)
        after = np.linalg.norm(err.mean(axis=0))
        assert after <= 1e-2 * np.linalg.norm(delta), (path, after, np.linalg.norm(delta))


def test_option_off_keeps_the_bias():
    model, calib, _ = tiny_flux()
    cfg = pqjax.QuantConfig(method="permuquant_h", weights="nvfp4", acts="nvfp4",
                            options=(("bias_correction", False),))
    plan = get_method("permuquant_h")(model, calib, cfg, quantizable(model, cfg))
    assert not any("bias_correction" in e for e in plan.extras.values())
