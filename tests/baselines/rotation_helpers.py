"""Shared by the rotation / QuaRTZ baseline tests: a tiny random FLUX built directly in NNX
(no torch), calibrated once per process, and a full-precision evaluation of a Plan."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pqjax
from pqjax.methods import Plan
from pqjax.models.flux import FluxConfig, FluxTransformer2DModel
from pqjax.models.paths import module_at
from pqjax.quantize import set_module
from pqjax.rotate import apply_input_transform
from tests.parity import TINY_FLUX

CFG = FluxConfig(**TINY_FLUX)


def randomize(model: nnx.Module, std: float = 0.2, seed: int = 0) -> None:
    """Every parameter ~ N(0, std), 1-D norm weights ~ 1 + N(0, std) (like tests.parity)."""
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        v = var.get_value()
        noise = rng.standard_normal(v.shape).astype(np.float32) * std
        name = ".".join(str(p) for p in path)
        is_norm_weight = "norm" in name and v.ndim == 1 and path[-1] in ("weight", "scale")
        var.set_value(jnp.asarray(1.0 + noise if is_norm_weight else noise, v.dtype))


def make_inputs(batch: int, h: int, w: int, n_txt: int, seed: int) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    img_ids = np.stack([np.zeros(h * w), rows.ravel(), cols.ravel()], -1)
    f32 = np.float32
    return {
        "hidden_states": jnp.asarray(rng.standard_normal((batch, h * w, CFG.in_channels)), f32),
        "encoder_hidden_states": jnp.asarray(
            rng.standard_normal((batch, n_txt, CFG.joint_attention_dim)), f32
        ),
        "pooled_projections": jnp.asarray(
            rng.standard_normal((batch, CFG.pooled_projection_dim)), f32
        ),
        "timestep": jnp.asarray(rng.random(batch), f32),
        "img_ids": jnp.asarray(img_ids, f32),
        "txt_ids": jnp.zeros((n_txt, 3), f32),
        "guidance": jnp.full((batch,), 3.5, f32),
    }


@functools.cache
def tiny_flux() -> tuple[nnx.Module, Any, list[dict[str, jax.Array]]]:
    """(model, calibration, input batches), built once per test process."""
    model = FluxTransformer2DModel(CFG, rngs=nnx.Rngs(1))
    randomize(model, seed=1)
    data = [make_inputs(2, 4, 4, 6, seed=s) for s in range(3)]
    return model, pqjax.calibrate(model, data, n_rows=96, progress=False), data


@nnx.jit
def forward(model: nnx.Module, inputs: dict[str, jax.Array]) -> jax.Array:
    return model(**inputs)


class TransformedLinear(nnx.Module):
    """Full-precision stand-in for a QuantLinear: y = linear(T(x)) with T^T W as its kernel."""

    def __init__(self, linear: nnx.Module, transform: str | None):
        self.linear = linear
        self.transform = transform

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.transform is not None:
            x = apply_input_transform(self.transform, x)
        return self.linear(x)


def full_precision_model(plan: Plan, targets: list[str]) -> nnx.Module:
    """The Plan's model with its replacement kernels and online transforms, no quantizer
    (a bias correction is the quantized layer's and is left out)."""
    model = nnx.clone(plan.model)
    for path in targets:
        extras = plan.extras.get(path, {})
        assert set(extras) <= {"input_transform", "act_amax", "bias_correction"}, extras
        lin = module_at(model, path)
        if path in plan.kernels:
            lin.kernel.set_value(jnp.asarray(plan.kernels[path], lin.kernel[...].dtype))
        set_module(model, path, TransformedLinear(lin, extras.get("input_transform")))
    return model


def rel_err(out: Any, ref: Any) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
