"""Shared fixtures for the baseline tests: a calibrated tiny random FLUX and a full-precision
evaluator of a method's Plan (what the QuantLinears compute, with no rounding)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pqjax
from pqjax.methods import Plan
from pqjax.models.paths import module_at
from pqjax.quantize import set_module
from tests.parity import TINY_FLUX

N_STEPS = 3  # calibration batches, each standing for one timestep


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> tuple[nnx.Module, Any, list[dict[str, Any]]]:
    """(model, calibration with per-batch absmax for N_STEPS batches, the batches)."""
    pytest.importorskip("torch")
    import convert
    from tests.models.test_flux import make_inputs, torch_flux
    from tests.parity import to_jax

    folder = tmp_path_factory.mktemp("tiny_flux_baselines")
    torch_flux(TINY_FLUX, seed=1).save_pretrained(folder)
    model = convert.load_transformer(folder)
    data = [
        {k: to_jax(v) for k, v in make_inputs(TINY_FLUX, 2, 4, 4, 6, seed=s).items()}
        for s in range(N_STEPS)
    ]
    calib = pqjax.calibrate(model, data, n_rows=96, progress=False, track_batches=N_STEPS)
    return model, calib, data


class PlanLinear(nnx.Module):
    """A Plan's replacement of one Linear in full precision: `QuantLinear` without rounding.

    y = T(x s) @ K + (x s) @ down @ up + bias, with s the input_scale, K the kernel to
    quantize (Plan.kernels, else the model's) and T the input transform (if any).
    """

    def __init__(self, kernel: jax.Array, bias: Any, extras: dict[str, Any]):
        self.kernel = nnx.data(jnp.asarray(kernel))
        self.bias = nnx.data(bias)
        self.scale = nnx.data(extras.get("input_scale"))
        self.low_rank = nnx.data(extras.get("low_rank"))
        self.transform = extras.get("input_transform")

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.scale is not None:
            x = x * self.scale
        xt = x
        if self.transform is not None:
            from pqjax.rotate import apply_input_transform

            xt = apply_input_transform(self.transform, x)
        y = jnp.dot(xt, self.kernel)
        if self.low_rank is not None:
            down, up = self.low_rank
            y = y + (x @ down) @ up
        return y if self.bias is None else y + self.bias[...]


def plan_model(plan: Plan) -> nnx.Module:
    """plan.model with every Linear that has replacement kernels or extras evaluated as
    `PlanLinear` (full precision; qweights are ignored)."""
    model = nnx.clone(plan.model)
    for path in sorted(set(plan.kernels) | set(plan.extras)):
        lin = module_at(model, path)
        kernel = plan.kernels.get(path, lin.kernel[...])
        set_module(model, path, PlanLinear(kernel, lin.bias, plan.extras.get(path, {})))
    return model


@pytest.fixture(scope="session")
def plan_forward() -> Callable[[Plan, dict[str, Any]], np.ndarray]:
    """plan_forward(plan, batch) -> the Plan's model output in full precision."""

    def forward(plan: Plan, batch: dict[str, Any]) -> np.ndarray:
        return np.asarray(plan_model(plan)(**batch))

    return forward
