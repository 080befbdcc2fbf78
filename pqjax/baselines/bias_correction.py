"""Bias correction: the mean output error of a quantized Linear on its calibration rows,
subtracted from its bias (Nagel et al. 2019, "Data-Free Quantization Through Weight
Equalization and Bias Correction", here with calibration data).

    delta = mean_output_error(lin, rows, weights=wfmt, acts=afmt, act_amax=a, kernel=k, ...)
    plan.extras[path]["bias_correction"] = delta        # pqjax.quantize: bias - delta

Why (benchmarks/coherent_error.py, embedded tiny FLUX, NVFP4): the error a sampling loop does
not damp is the part every token and step shares. A rotated layer's NVFP4 error carries more of
it: PermuQuant-H's final latent error was 17% one image-wide offset against 2-4% for RTN,
PermuQuant and Hadamard, and removing each layer's mean error gained it more than it gained
PermuQuant. The correction is a (d_out,) float vector per layer, folded into the bias the
layer already stores; the model's full-precision function is untouched (the plan's model
stays exact), only the quantized layer's output mean moves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pqjax import formats
from pqjax.calibrate import Calibration
from pqjax.layers import QuantLinear, QuantState
from pqjax.models.layers import Linear
from pqjax.models.paths import module_at

if TYPE_CHECKING:
    from pqjax.quantize import QuantConfig


@nnx.jit  # the transform name is static module state: one program per transform and shape
def _mean_error(q: QuantLinear, lin: Linear, x: jax.Array) -> jax.Array:
    return jnp.mean(q(x).astype(jnp.float32) - lin(x).astype(jnp.float32), axis=0)


def mean_output_error(
    lin: Linear,
    rows: Any,
    *,
    weights: formats.Format,
    acts: formats.Format | None,
    act_amax: float | None,
    kernel: jax.Array | None = None,
    input_transform: str | None = None,
    input_scale: Any = None,
) -> np.ndarray:
    """mean over rows of (quantized - full-precision) output, `(d_out,)` float32.

    lin: the full-precision Linear as the quantized model holds it (orders absorbed); rows
    `(n, d_in)`: its inputs in that order; the other arguments as `pqjax.quantize.apply_plan`
    builds the deployed QuantLinear from a plan (replacement kernel, static NVFP4 activation
    absmax, online transform and scale), so the error is the deployed layer's.
    """
    q = QuantLinear.from_linear(lin, weights=weights, acts=acts, act_amax=act_amax,
                                kernel=kernel)
    if input_scale is not None:
        q.input_scale = QuantState(jnp.asarray(input_scale, q.dtype))
    q.input_transform = input_transform
    x = jnp.asarray(rows, lin.kernel[...].dtype)
    return np.asarray(_mean_error(q, lin, x), np.float32)


def layer_bias_correction(
    absorbed: nnx.Module, calib: Calibration, config: QuantConfig, path: str,
    kernel: jax.Array, extras: dict[str, Any], perm: np.ndarray | None,
    folded_scale: np.ndarray | None,
) -> np.ndarray:
    """The (d_out,) mean output error of the layer at `path` as `pqjax.quantize.apply_plan`
    deploys it (replacement `kernel`, `extras`), on its calibration rows as the absorbed model
    feeds them: divided by the site's folded scale, in the site's order `perm`."""
    rows = jnp.asarray(calib[path].rows, jnp.float32)
    if folded_scale is not None:
        rows = rows / jnp.asarray(folded_scale, jnp.float32)
    if perm is not None:
        rows = rows[:, jnp.asarray(perm)]
    return mean_output_error(
        module_at(absorbed, path), rows, weights=config.weight_format(),
        acts=config.act_format(), act_amax=extras.get("act_amax", jnp.max(calib[path].absmax)),
        kernel=kernel, input_transform=extras.get("input_transform"),
        input_scale=extras.get("input_scale"))
