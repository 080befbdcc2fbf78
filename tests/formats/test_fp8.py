"""FP8 E4M3: per tensor / token / channel, bit-exact vs numpy (both rounding back ends)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pqjax import formats
from tests.formats import numpy_reference as ref
from tests.formats.helpers import DATASETS, F32, SHAPE, check_against, fp8_ties, jitted


@pytest.mark.parametrize("scaling", ["tensor", "token", "channel"])
@pytest.mark.parametrize("rounding", ["grid", "ml_dtypes"])
def test_matches_reference(scaling, rounding):
    fmt = formats.get("fp8", scaling=scaling)
    for data in ("normal", "heavy", "adversarial", "adversarial_nohuge"):
        x = DATASETS[data]()
        qt, dq, fq = jitted(fmt)(x)
        check_against(qt, dq, fq, ref.reference("fp8", x, rounding, scaling=scaling), f"fp8 {data}")
    for per_row in (True, False):
        x = fp8_ties(per_row=per_row)
        qt, dq, fq = jitted(fmt)(x)
        check_against(qt, dq, fq, ref.reference("fp8", x, rounding, scaling=scaling), "fp8 ties")


def test_odd_shape_and_scale_shapes():
    x = DATASETS["odd_shape"]()
    qt, dq, fq = jitted(formats.get("fp8", scaling="token"))(x)
    assert qt.codes.dtype == jnp.float8_e4m3fn and qt.codes.shape == x.shape
    assert qt.block_scale.shape == (x.shape[0], 1) and qt.block_scale.dtype == jnp.float32
    check_against(qt, dq, fq, ref.reference("fp8", x, scaling="token"), "fp8 odd")
    assert jax.eval_shape(formats.get("fp8").quantize, x).block_scale.shape == ()


def test_static_scale_saturates():
    x = np.random.default_rng(8).standard_normal(SHAPE).astype(F32) * 10
    fmt = formats.get("fp8", scaling="tensor")
    f = jax.jit(lambda x, s: (fmt.quantize(x, scale=s), fmt.fake_quant(x, scale=s)))
    qt, fq = f(x, F32(0.01))  # x / s reaches 4000: clipped to 448, no NaN
    want = ref.reference("fp8", x, scaling="tensor", scale=F32(0.01))
    check_against(qt, qt.dequantize(), fq, want, "fp8 static scale")
    assert np.abs(np.asarray(qt.codes.astype(jnp.float32))).max() == 448


def test_zero_rows():
    x = np.zeros((3, 8), F32)
    x[1] = -0.0
    x[2, 3] = 5.0
    qt, dq, fq = jitted(formats.get("fp8", scaling="token"))(x)
    assert np.asarray(qt.block_scale)[:2].tolist() == [[0.0], [0.0]]
    check_against(qt, dq, fq, ref.reference("fp8", x, scaling="token"), "fp8 zero rows")
    assert np.signbit(np.asarray(dq[1])).all() and not np.isnan(np.asarray(dq)).any()
