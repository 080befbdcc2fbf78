"""permuquant_hs: a per-channel smoothing scale chosen jointly with the rotation and the order.

The reference for exactness is the model's own full-precision forward (the folds must leave it
unchanged); the reference for the choice is permuquant_h on the same calibration rows (no scale
is one of permuquant_hs's candidates, so per site it can only end at or below it)."""

from __future__ import annotations

import numpy as np
import pytest

import pqjax
from pqjax.methods import get_method
from pqjax.quantize import quantizable
from tests.baselines.conftest import plan_model
from tests.baselines.rotation_helpers import forward, tiny_flux
from tests.baselines.test_permuquant_h_models import sana_case, zimage_case
from tests.parity import assert_close_rel

CONFIGS = {
    "nvfp4": dict(weights="nvfp4", acts="nvfp4"),
    "int4_g64": dict(weights="int4", acts="int4", group=64),
}
SLACK = 1 + 1e-5  # the same error evaluated in different jit programs (summation order)


def plans(model, calib, config: str, **hs_options) -> tuple[dict, dict, list[str]]:
    out = {}
    for method in ("permuquant_hs", "permuquant_h"):
        options = tuple(hs_options.items()) if method == "permuquant_hs" else ()
        cfg = pqjax.QuantConfig(method=method, options=options, **CONFIGS[config])
        targets = quantizable(model, cfg)
        out[method] = get_method(method)(model, calib, cfg, targets)
    return out["permuquant_hs"], out["permuquant_h"], targets


@pytest.mark.parametrize("config, online", [("nvfp4", False), ("int4_g64", False),
                                            ("int4_g64", True)])
def test_never_worse_than_permuquant_h_on_calibration_rows(config, online):
    """Per site, summed over its consumers: permuquant_hs <= permuquant_h; per layer <= RTN
    (the acceptance rule, every consumer on its own rows). And the scale is kept somewhere:
    the tiny FLUX's random channel gains are what smoothing is for. Option online: also
    where no scale folds (applied by the consumers), the same bounds."""
    model, calib, _ = tiny_flux()
    hs, h, targets = plans(model, calib, config, online=online)
    online_layers = sorted(p for p, ex in hs.extras.items() if "input_scale" in ex)
    assert bool(online_layers) == online, online_layers
    assert set(hs.layers) == set(h.layers)
    by_site: dict = {}
    for path, row in hs.layers.items():
        by_site.setdefault(row["site"] or path, []).append(path)
        assert row["err"] <= row["err_rtn"] * SLACK, (path, row)
    for paths in by_site.values():
        e_hs = sum(hs.layers[p]["err"] for p in paths)
        e_h = sum(h.layers[p]["err"] for p in paths)
        assert e_hs <= e_h * SLACK, (paths, e_hs, e_h)
    smoothed = [n for n, row in hs.sites.items() if row["smooth_alpha"] is not None]
    print(config, "sites smoothed:", smoothed)
    assert smoothed
    total = sum(hs.layers[p]["err"] for p in targets if p in hs.layers)
    assert total < sum(h.layers[p]["err"] for p in targets if p in h.layers)


def test_flux_plan_is_exact_in_full_precision():
    model, calib, data = tiny_flux()
    hs, _, _ = plans(model, calib, "int4_g64", online=True)
    assert any(row["smooth_alpha"] is not None for row in hs.sites.values())
    online = sorted(p for p, ex in hs.extras.items() if "input_scale" in ex)
    print("scales applied online:", online)
    assert online  # after GELU / SiLU, or a layer no site reads: QuantLinear.input_scale
    ref = np.asarray(forward(model, data[0]))
    # float32 forward of a different but equivalent graph: 1e-5 relative (the sites tests' bar)
    assert_close_rel(np.asarray(forward(plan_model(hs), data[0])), ref, 1e-5,
                     "flux permuquant_hs in full precision")


@pytest.mark.parametrize("family", ["sana", "zimage"])
def test_sana_and_zimage_plans_are_exact_in_full_precision(family):
    model, batches, run = {"sana": sana_case, "zimage": zimage_case}[family]()
    calib = pqjax.calibrate(model, batches, n_rows=64, forward=run, progress=False)
    cfg = pqjax.QuantConfig(method="permuquant_hs", **CONFIGS["int4_g64"])
    plan = get_method("permuquant_hs")(model, calib, cfg, quantizable(model, cfg))
    kept = {n: row["smooth_alpha"] for n, row in plan.sites.items()}
    print(family, "scales kept:", kept)
    assert any(a is not None for a in kept.values())
    ref = np.asarray(run(model, **batches[1]))
    out = np.asarray(run(plan_model(plan), **batches[1]))
    assert_close_rel(out, ref, 1e-5, f"{family} permuquant_hs in full precision")


def test_alphas_are_checked_when_the_config_is_built():
    with pytest.raises(ValueError, match="alphas"):
        pqjax.QuantConfig(method="permuquant_hs", options=(("alphas", (0.5, 1.5)),))
