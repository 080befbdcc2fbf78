"""Integer formats: every bit width, both variants, every group kind, bit-exact vs numpy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pqjax import formats
from tests.formats import numpy_reference as ref
from tests.formats.helpers import (
    DATASETS,
    F32,
    ODD_SHAPE,
    SHAPE,
    adversarial,
    check_against,
    heavy_tailed,
    int_ties,
    jitted,
)

GROUPS = (16, 32, 64, 128, None)
# every bit width with both variants; the groups rotate so that each (variant, group) pair and
# each bit width is covered while keeping the number of compilations down
CASES = [(b, sym, GROUPS[(b + 2 * (not sym)) % 5]) for b in range(2, 9) for sym in (True, False)]


def _fmt(bits: int, sym: bool, group):
    return formats.get(f"int{bits}" + ("" if sym else "_asym"), group=group)


@pytest.mark.parametrize(("bits", "sym", "group"), CASES)
def test_matches_reference(bits, sym, group):
    fmt = _fmt(bits, sym, group)
    for name, x in [
        ("heavy", heavy_tailed()),
        ("adversarial", adversarial()),
        ("ties", int_ties(bits, sym, SHAPE, group)),
    ]:
        qt, dq, fq = jitted(fmt)(x)
        want = ref.reference(fmt.name, x, group=group)
        check_against(qt, dq, fq, want, f"{fmt.name} g{group} {name}")


@pytest.mark.parametrize("name", ["int4", "int3_asym"])
def test_padding_odd_shape(name):
    x = DATASETS["odd_shape"]()
    fmt = formats.get(name)
    qt, dq, fq = jitted(fmt)(x)
    assert qt.shape == ODD_SHAPE and dq.shape == ODD_SHAPE
    assert qt.block_scale.shape == (3, 2)  # 100 -> 128 = 2 groups of 64
    check_against(qt, dq, fq, ref.reference(name, x), f"{name} odd shape")


def test_scale_edges_symmetric():
    fmt = formats.get("int4", group=16)
    x = np.zeros((4, 64), F32)
    x[0, :16] = np.linspace(-1e6, 1e6, 16)  # amax / 7 > 65504: the scale saturates
    x[1, :16] = np.linspace(-3e-4, 3e-4, 16)  # scale is a float16 subnormal
    x[2, :16] = 1e-9  # scale rounds to 0 in float16: encodes zero
    x[3, :16] = 7 * 0.75 * np.array([1, -1] * 8)  # exactly +-qmax * s
    qt, dq, fq = jitted(fmt)(x)
    s = np.asarray(qt.block_scale)
    assert s.dtype == np.float16
    assert s[0, 0] == np.float16(65504) and s[2, 0] == 0 and s[3, 0] == np.float16(0.75)
    assert 0 < s[1, 0] < np.finfo(np.float16).tiny
    assert (np.abs(np.asarray(dq[0, :16])) <= 7 * 65504).all()
    assert (np.asarray(dq[2]) == 0).all()
    check_against(qt, dq, fq, ref.reference("int4", x, group=16), "int4 scale edges")


def test_asymmetric_range_contains_zero():
    fmt = formats.get("int4_asym", group=16)
    x = np.zeros((2, 16), F32)
    x[0] = np.linspace(5, 7.5, 16)  # all positive: lo = 0, zero point 0, scale 0.5
    x[1] = -3.75  # constant negative block: hi = 0, zero point qmax, scale 0.25
    qt, dq, fq = jitted(fmt)(x)
    assert np.asarray(qt.zero_point).tolist() == [[0], [15]]
    assert float(dq[1, 0]) == -3.75 and float(dq[0, -1]) == 7.5
    check_against(qt, dq, fq, ref.reference("int4_asym", x, group=16), "int4_asym range")


def test_storage_layout():
    x = jax.ShapeDtypeStruct((2, 16), jnp.float32)
    q3 = jax.eval_shape(formats.get("int3", group=16).quantize, x)
    assert q3.codes.shape == (2, 6) and q3.codes.dtype == jnp.uint8  # 16 * 3 bits
    q8 = jax.eval_shape(formats.get("int8", group=16).quantize, x)
    assert q8.codes.dtype == jnp.int8 and q8.codes.shape == (2, 16)
    qa = jax.eval_shape(formats.get("int8_asym", group=16).quantize, x)
    assert qa.codes.dtype == jnp.uint8 and qa.zero_point.dtype == jnp.uint8
    # channel groups: one scale for the whole last axis
    qc = jax.eval_shape(formats.get("int5", group="channel").quantize, x.update(shape=(2, 13)))
    assert qc.block_scale.shape == (2, 1) and qc.codes.shape == (2, 9)  # ceil(13 * 5 / 8)
    # int4 two's complement nibbles, element 0 low: 7 and -7 = 0b1001
    q4 = jitted(formats.get("int4", group=16))(np.array([[7.0, -7.0] + [0.0] * 14], F32))[0]
    assert int(q4.codes[0, 0]) == 0x7 | (0x9 << 4)
