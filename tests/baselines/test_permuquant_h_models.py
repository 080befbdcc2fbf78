"""permuquant_h's joint (rotation, order) choice on tiny SANA and Z-Image models: the absorbed
orders and folded rotations leave the full-precision output unchanged (FLUX: test_hadamard)."""

from __future__ import annotations

import numpy as np
import pytest

import pqjax
from pqjax.methods import get_method
from pqjax.models.sana import SanaTransformer2DModel
from pqjax.models.zimage import ZImageConfig, ZImageTransformer2DModel
from pqjax.quantize import quantizable
from tests.baselines.conftest import plan_model
from tests.models.test_zimage import CONFIGS as ZCONFIGS
from tests.parity import assert_close_rel, random_nnx
from tests.permute.test_model_sites import zimage_inputs
from tests.permute.test_sana_sites import CONFIGS as SCONFIGS
from tests.permute.test_sana_sites import sana_inputs


def zimage_case():
    cfg = ZCONFIGS["small_qknorm"]
    config = ZImageConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})
    model = random_nnx(ZImageTransformer2DModel, config, 0.07, channel_gains=True)
    keys = ("latents", "t", "caps", "lengths")
    batches = [dict(zip(keys, zimage_inputs(config, seed=s))) for s in range(2)]

    def run(m, latents, t, caps, lengths):
        return m.forward_batch(latents, t, caps, lengths)

    return model, batches, run


def sana_case():
    config = SCONFIGS["qk_norm"]
    model = random_nnx(SanaTransformer2DModel, config, 0.2, channel_gains=True)
    batches = [sana_inputs(config, seed=s) for s in range(2)]
    return model, batches, lambda m, **b: m(**b)


@pytest.mark.parametrize("family", ["sana", "zimage"])
def test_joint_choice_is_exact_in_full_precision(family):
    model, batches, run = {"sana": sana_case, "zimage": zimage_case}[family]()
    calib = pqjax.calibrate(model, batches, n_rows=64, forward=run, progress=False)
    cfg = pqjax.QuantConfig(method="permuquant_h",
                            options=(("rotations", "rotated"),))
    targets = quantizable(model, cfg)
    plan = get_method("permuquant_h")(model, calib, cfg, targets)
    names = {e["input_transform"] for e in plan.extras.values() if "input_transform" in e}
    print(family, "rotations:", sorted(names), "orders:", sorted(plan.perms))
    assert names and plan.perms  # rotations folded and orders absorbed
    for row in plan.layers.values():  # on calibration rows the pair never loses to its
        assert row["err"] <= row["err_reference"]  # reference (here the group rotation)
    ref = np.asarray(run(model, **batches[1]))
    out = np.asarray(run(plan_model(plan), **batches[1]))
    # float32 forward of a different but equivalent graph: 1e-5 relative (the sites tests' bar)
    assert_close_rel(out, ref, 1e-5, f"{family} permuquant_h in full precision")
