"""Elementwise building blocks (E2M1, E4M3, E8M0, floor_log2, FTZ, division) against references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pqjax import formats
from tests.formats import numpy_reference as ref
from tests.formats.helpers import F32, assert_same_bits

ROUNDINGS = ("grid", "ml_dtypes")


def _neighbours(values: np.ndarray, k: int = 3) -> np.ndarray:
    """Each float32 value and its k nearest float32 neighbours on each side, both signs."""
    v = np.asarray(values, F32)
    out = [v]
    up, down = v.copy(), v.copy()
    for _ in range(k):
        up = np.nextafter(up, F32(np.inf))
        down = np.nextafter(down, F32(-np.inf))
        out += [up, down]
    a = np.concatenate(out)
    return np.concatenate([a, -a]).astype(F32)


def _random_bits(n: int, seed: int, finite_only: bool = True) -> np.ndarray:
    b = np.random.default_rng(seed).integers(0, 2**32, size=n, dtype=np.uint64).astype(np.uint32)
    x = b.view(F32)
    return x[np.isfinite(x)] if finite_only else x


SPECIALS = np.array(
    [
        0.0,
        -0.0,
        1e-45,
        -1e-45,
        1e-40,
        -1e-40,
        2.0**-126,
        -(2.0**-126),
        3.0e38,
        np.finfo(np.float32).max,
        -np.finfo(np.float32).max,
    ],
    F32,
)


def test_ml_dtypes_cast_behaviour_is_what_the_reference_assumes():
    # float4_e2m1fn casts saturate in ml_dtypes 0.6 (no inf/NaN in the format) ...
    big = np.array([6.5, 7.0, 1e30, np.inf, -1e30], F32).astype(ml_dtypes.float4_e2m1fn)
    assert big.astype(F32).tolist() == [6.0, 6.0, 6.0, 6.0, -6.0]
    # ... while e4m3fn overflow past the rounding boundary becomes NaN, hence the explicit clip
    e4 = np.array([464.0, 480.0], F32).astype(ml_dtypes.float8_e4m3fn).astype(F32)
    assert e4[0] == 448.0 and np.isnan(e4[1])


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_e2m1_encode_matches_references(rounding):
    mids = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 7.0, 8.0], F32)
    grid = ref.E2M1_GRID.astype(F32)
    v = np.concatenate(
        [
            _neighbours(mids),
            _neighbours(grid),
            SPECIALS,
            _random_bits(200_000, 0),
            np.random.default_rng(1).uniform(-8, 8, 100_000).astype(F32),
        ]
    )
    got = jax.jit(formats.e2m1_encode)(v)
    assert_same_bits(got, ref.e2m1_codes(v, rounding), f"e2m1 codes ({rounding})")


def test_e2m1_decode_all_codes():
    codes = np.arange(16, dtype=np.uint8)
    want = codes.view(ml_dtypes.float4_e2m1fn).astype(F32)
    assert_same_bits(jax.jit(formats.e2m1_decode)(codes), want, "e2m1 decode")
    assert_same_bits(formats.e2m1_decode(codes), ref.e2m1_values(codes), "e2m1 decode (grid)")
    assert np.signbit(np.asarray(formats.e2m1_decode(np.uint8(8))))  # code 8 is -0.0


def test_e2m1_round_saturates_and_keeps_sign_of_zero():
    v = np.array([5.0, 5.0001, 1e9, -1e9, -0.1, -0.0, 0.25, 0.2500001], F32)
    got = np.asarray(formats.e2m1_round(v))
    assert_same_bits(got, np.array([4, 6, 6, -6, -0.0, -0.0, 0, 0.5], F32), "e2m1_round")


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_e4m3_round_matches_references(rounding):
    grid = ref.E4M3_GRID
    mids = ((grid[1:] + grid[:-1]) / 2).astype(F32)  # all exactly representable in float32
    v = np.concatenate(
        [
            _neighbours(mids),
            _neighbours(grid.astype(F32)),
            SPECIALS,
            np.array([448.0, 463.9, 464.0, 464.1, 480.0, 1e6], F32),
            _random_bits(200_000, 2),
            np.random.default_rng(3).uniform(-500, 500, 100_000).astype(F32),
            np.random.default_rng(4).uniform(-(2.0**-5), 2.0**-5, 100_000).astype(F32),
        ]
    )
    got = jax.jit(formats.e4m3_round)(v)
    assert_same_bits(got, ref.e4m3_round(v, rounding), f"e4m3 round ({rounding})")
    enc = jax.jit(formats.e4m3_encode)(v)
    assert enc.dtype == jnp.float8_e4m3fn
    assert_same_bits(enc, ref.e4m3_round(v, rounding).astype(ml_dtypes.float8_e4m3fn), "e4m3 enc")


def test_floor_log2_exact_including_subnormals():
    pos = np.abs(_random_bits(200_000, 5))
    pos = pos[pos > 0]
    powers = np.ldexp(F32(1), np.arange(-149, 128)).astype(F32)
    v = np.concatenate([pos, powers, np.nextafter(powers, F32(0)), np.nextafter(powers, F32(9))])
    v = v[(v > 0) & np.isfinite(v)].astype(F32)
    got = np.asarray(jax.jit(formats.floor_log2)(v))
    np.testing.assert_array_equal(got, ref.floor_log2(v))
    assert int(formats.floor_log2(np.float32(0))) == -150


def test_e8m0_exponent_and_storage():
    amax = np.array(
        [
            0.0,
            1e-45,
            2.0**-126,
            2.0**-124,
            2.0**-123,
            1.0,
            3.9,
            4.0,
            7.99,
            8.0,
            np.finfo(np.float32).max,
        ],
        F32,
    )
    e = np.asarray(formats.e8m0_exponent(amax))
    with np.errstate(divide="ignore"):
        want = np.where(amax > 0, np.clip(ref.floor_log2(amax) - 2, -127, 127), -127)
    np.testing.assert_array_equal(e, want)
    assert e.tolist()[:5] == [-127, -127, -127, -126, -125]
    s = formats.e8m0_from_exponent(jnp.asarray(e))
    assert s.dtype == jnp.float8_e8m0fnu
    for rounding in ROUNDINGS:
        assert_same_bits(s, ref.e8m0_from_exponent(e, rounding), f"e8m0 ({rounding})")
    np.testing.assert_array_equal(np.asarray(formats.e8m0_to_exponent(s)), e)


def test_ftz_flushes_subnormals_to_signed_zero():
    v = np.array([1e-45, -1e-45, 1e-39, -(2.0**-127), 2.0**-126, -0.0, 1.0], F32)
    got = jax.jit(formats.ftz)(v)
    assert_same_bits(got, np.array([0, -0.0, 0, -0.0, 2.0**-126, -0.0, 1], F32), "ftz")
    assert_same_bits(got, ref.ftz(v), "ftz vs reference")


def test_exact_div_is_ieee_where_xla_would_use_a_reciprocal():
    from pqjax.formats.base import exact_div

    rng = np.random.default_rng(6)
    a = rng.standard_normal((512, 16)).astype(F32) * 100
    b = (np.abs(rng.standard_normal((512, 1))) + 0.1).astype(F32)
    with np.errstate(all="ignore"):
        assert_same_bits(jax.jit(exact_div)(a, b), a / b, "a / broadcast(b)")
        f = jax.jit(lambda a: exact_div(a, F32(2688)))
        assert_same_bits(f(a), a / F32(2688), "a / constant")


def test_mul_pow2_full_exponent_range():
    vals = ref.E2M1_GRID.astype(F32)[1:]
    e = np.arange(-127, 126, dtype=np.int32)  # the exponents MX uses (6 * 2**125 is finite)
    got = np.asarray(jax.jit(formats.mul_pow2)(vals[:, None], e[None, :]))
    want = ref.ftz((vals[:, None].astype(np.float64) * np.exp2(e[None, :])).astype(F32))
    assert_same_bits(got, want, "mul_pow2")
