"""NVFP4: bit-exact agreement with the numpy reference (both rounding back ends)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pqjax import formats
from tests.formats import numpy_reference as ref
from tests.formats.helpers import (
    DATASETS,
    F32,
    SHAPE,
    assert_same_bits,
    check_against,
    jitted,
    nvfp4_ties,
)

FMT = formats.get("nvfp4")


@pytest.mark.parametrize("data", sorted(DATASETS))
@pytest.mark.parametrize("rounding", ["grid", "ml_dtypes"])
def test_matches_reference(data, rounding):
    x = DATASETS[data]()
    qt, dq, fq = jitted(FMT)(x)
    check_against(qt, dq, fq, ref.reference("nvfp4", x, rounding), f"nvfp4 {data} {rounding}")


@pytest.mark.parametrize("rounding", ["grid", "ml_dtypes"])
def test_exact_ties_with_static_global_scale(rounding):
    x, gs = nvfp4_ties()
    qt, dq, fq = jitted(FMT, True)(x, gs)
    check_against(
        qt, dq, fq, ref.reference("nvfp4", x, rounding, global_scale=gs), f"nvfp4 ties {rounding}"
    )
    # the construction really produces ties: RNE picks the even neighbour
    v = np.asarray(formats.e2m1_decode(formats.unpack_bits(qt.codes, 4, SHAPE[-1])))
    assert np.isin(np.abs(v), [0.0, 1.0, 2.0, 4.0, 6.0]).all()


def test_static_global_scale_saturation_and_extremes():
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(SHAPE) * 100).astype(F32)
    for gs in [F32(1e-3), F32(0.0), F32(1e-37), F32(3e37), F32(2.0**-126)]:
        qt, dq, fq = jitted(FMT, True)(x, gs)
        check_against(qt, dq, fq, ref.reference("nvfp4", x, global_scale=gs), f"nvfp4 gs={gs}")
    qt, dq, _ = jitted(FMT, True)(x, F32(1e-3))
    bs = np.asarray(qt.block_scale.astype(jnp.float32))
    assert (bs == 448).all()  # block_amax / (6 gs) > 448 saturates
    assert np.abs(np.asarray(dq)).max() == np.float32(6 * 448) * F32(1e-3)


def test_all_zero_tensor_and_blocks():
    x = np.zeros(SHAPE, F32)
    x[0, 1] = -0.0
    qt, dq, fq = jitted(FMT)(x)
    assert float(qt.global_scale) == 0.0
    assert not np.isnan(np.asarray(dq)).any()
    assert_same_bits(dq, x, "zero tensor round trip keeps signed zeros")
    check_against(qt, dq, fq, ref.reference("nvfp4", x), "nvfp4 zeros")


def test_block_scale_rounding_to_zero_encodes_zero():
    x = np.zeros(SHAPE, F32)
    x[0, 0] = 1.0
    x[1, :16] = np.linspace(-1e-7, 1e-7, 16)  # 448 * 1e-7 < 2**-10: E4M3 scale rounds to 0
    qt, dq, fq = jitted(FMT)(x)
    bs = np.asarray(qt.block_scale.astype(jnp.float32))
    assert bs[1, 0] == 0.0 and bs[0, 0] == 448.0
    assert_same_bits(dq[1, :16], np.copysign(np.zeros(16, F32), x[1, :16]), "zero block")
    check_against(qt, dq, fq, ref.reference("nvfp4", x), "nvfp4 scale->0")


def test_layout_and_global_scale_definition():
    x = np.zeros((2, 40), F32)  # 40 -> padded to 48: 3 blocks, 24 bytes per row
    x[0, 0], x[0, 1], x[1, 39] = 3.0, -1.5, 6.0 * 448 * 2
    qt = jitted(FMT)(x)[0]
    assert qt.codes.shape == (2, 24) and qt.codes.dtype == jnp.uint8
    assert qt.block_scale.shape == (2, 3) and qt.block_scale.dtype == jnp.float8_e4m3fn
    assert qt.global_scale.dtype == jnp.float32 and qt.global_scale.shape == ()
    assert float(qt.global_scale) == 2.0  # amax / (6 * 448)
    # bs = 3 / (6 * 2) = 0.25, denom 0.5: 3.0 -> 6 (code 0b0111), -1.5 -> -3 (code 0b1101);
    # element 0 sits in the low nibble
    assert int(qt.codes[0, 0]) == 0b0111 | (0b1101 << 4)
    assert qt.shape == (2, 40) and jitted(FMT)(x)[1].shape == (2, 40)
