"""MXFP4: bit-exact agreement with the numpy reference (both rounding back ends)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pqjax import formats
from tests.formats import numpy_reference as ref
from tests.formats.helpers import DATASETS, F32, SHAPE, check_against, jitted, mxfp4_ties

FMT = formats.get("mxfp4")


@pytest.mark.parametrize("data", sorted(DATASETS))
@pytest.mark.parametrize("rounding", ["grid", "ml_dtypes"])
def test_matches_reference(data, rounding):
    x = DATASETS[data]()
    qt, dq, fq = jitted(FMT)(x)
    check_against(qt, dq, fq, ref.reference("mxfp4", x, rounding), f"mxfp4 {data} {rounding}")


@pytest.mark.parametrize("rounding", ["grid", "ml_dtypes"])
def test_exact_ties_and_saturation(rounding):
    x = mxfp4_ties()
    qt, dq, fq = jitted(FMT)(x)
    check_against(qt, dq, fq, ref.reference("mxfp4", x, rounding), f"mxfp4 ties {rounding}")
    e = np.asarray(formats.e8m0_to_exponent(qt.block_scale))
    xg = x.reshape(SHAPE[0], -1, 32)
    # the leading element 7.5 * 2**e or -7.75 * 2**e is past 6 and saturates to +-6 * 2**e
    lead = np.asarray(dq).reshape(xg.shape)[..., 0]
    big = np.abs(xg[..., 0]) > 6 * np.exp2(e.astype(np.float64))
    assert big.any()
    np.testing.assert_array_equal(np.abs(lead[big]), (6 * np.exp2(e[big])).astype(F32))


def test_exponent_edges():
    x = np.zeros((4, 64), F32)
    x[0, 0] = 2.0**-125  # floor(log2) - 2 = -127: at the E8M0 floor
    x[0, 32] = 2.0**-126 * 1.5  # -128 -> clamped to -127
    x[1, :32] = np.finfo(np.float32).max  # floor(log2) = 127 -> 125
    x[2, 0] = 1e-40  # float32 subnormal: flushed, the block counts as all zero
    x[3, 32] = -0.0
    qt, dq, fq = jitted(FMT)(x)
    e = np.asarray(formats.e8m0_to_exponent(qt.block_scale))
    assert e.tolist() == [[-127, -127], [125, -127], [-127, -127], [-127, -127]]
    assert qt.block_scale.dtype == jnp.float8_e8m0fnu
    assert float(dq[0, 0]) == 2.0**-125 and float(dq[0, 32]) == 2.0**-126 * 1.5
    assert float(dq[1, 0]) == 6 * 2.0**125  # saturated (max / 2**125 is almost 8)
    assert float(dq[2, 0]) == 0.0 and np.signbit(np.asarray(dq[3, 32]))
    check_against(qt, dq, fq, ref.reference("mxfp4", x), "mxfp4 edges")
