"""Shared test data and bit-exact comparison helpers for tests/formats."""

from __future__ import annotations

import functools

import jax
import numpy as np

from pqjax import formats

F32 = np.float32
F32_MAX = np.finfo(np.float32).max
SHAPE = (6, 384)  # 384 = 3 * 128: whole groups for every group size
ODD_SHAPE = (3, 100)  # needs padding for every group size


def bits(a) -> np.ndarray:
    """Bit pattern of an array as unsigned ints of the same width (jax or numpy input)."""
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def assert_same_bits(got, want, what: str = "") -> None:
    """Exact equality of dtype, shape and every bit (so -0.0 != 0.0, NaN patterns compared)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    gb, wb = bits(got), bits(want)
    bad = np.argwhere(gb != wb)
    if len(bad):
        i = tuple(bad[0])
        raise AssertionError(
            f"{what}: {len(bad)} of {gb.size} differ; first at {i}: got {got[i]!r} "
            f"(0x{int(gb[i]):x}) want {want[i]!r} (0x{int(wb[i]):x})"
        )


@functools.cache
def jitted(fmt: formats.Format, with_gs: bool = False):
    """jit of x -> (QTensor, dequantized, fake_quant) for a format (optionally global_scale)."""
    if with_gs:

        def f(x, gs):
            qt = fmt.quantize(x, global_scale=gs)
            return qt, qt.dequantize(), fmt.fake_quant(x, global_scale=gs)

    else:

        def f(x):
            qt = fmt.quantize(x)
            return qt, qt.dequantize(), fmt.fake_quant(x)

    return jax.jit(f)


def check_against(qt, dq, fq, ref: dict, what: str) -> None:
    """Compare a pqjax result with a numpy_reference result, bit for bit."""
    assert_same_bits(qt.codes, ref["codes"], f"{what} codes")
    assert_same_bits(qt.block_scale, ref["block_scale"], f"{what} block_scale")
    if "global_scale" in ref:
        assert_same_bits(qt.global_scale, ref["global_scale"], f"{what} global_scale")
    if "zero_point" in ref:
        assert_same_bits(qt.zero_point, ref["zero_point"], f"{what} zero_point")
    assert_same_bits(dq, ref["dq"], f"{what} dequantized")
    assert_same_bits(fq, dq, f"{what} fake_quant vs dequantize")


# ------------------------------------------------------------------------------------ data


def random_normal(shape=SHAPE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(F32)


def heavy_tailed(shape=SHAPE, seed: int = 1) -> np.ndarray:
    """Student-t (df=2) values times lognormal per-channel (last-axis) scales, with outliers."""
    rng = np.random.default_rng(seed)
    t = rng.standard_t(2.0, size=shape)
    chan = rng.lognormal(0.0, 2.0, size=shape[-1])
    return (t * chan).astype(F32)


def _tie_block(n: int, unit: float, rng) -> np.ndarray:
    """n values that are odd multiples of unit/2 (grid midpoints when the step is `unit`)."""
    k = rng.integers(-12, 12, size=n)
    return ((2 * k + 1) * (unit / 2)).astype(F32)


def adversarial(shape=SHAPE, seed: int = 2, huge: bool = True) -> np.ndarray:
    """Blocks of 128 (whole groups for every group size) of awkward values, then random."""
    rng = np.random.default_rng(seed)
    sub = np.finfo(np.float32).smallest_subnormal
    tiny = np.finfo(np.float32).tiny
    blocks = [
        np.zeros(128, F32),
        np.where(rng.random(128) < 0.5, F32(-0.0), F32(0.0)),
        (rng.integers(1, 2**23, 128) * sub * rng.choice([-1, 1], 128)).astype(F32),
        np.concatenate([[tiny, -tiny], rng.integers(1, 100, 126) * sub]).astype(F32),
        (rng.standard_normal(128) * 1e-30).astype(F32),
        np.concatenate([[F32_MAX, -F32_MAX], rng.standard_normal(126) * 1e37]).astype(F32)
        if huge
        else (rng.standard_normal(128) * 1e4).astype(F32),
        # E2M1 midpoints for unit scale (mxfp4 amax in [4, 8) -> scale 1)
        np.tile(
            F32(
                [
                    0.25,
                    0.75,
                    1.25,
                    1.75,
                    2.5,
                    3.5,
                    5.0,
                    -0.25,
                    -0.75,
                    -1.25,
                    -1.75,
                    -2.5,
                    -3.5,
                    -5.0,
                    6.0,
                    -7.9,
                ]
            ),
            8,
        ),
        _tie_block(128, 0.5, rng),
        # values past MX saturation (|v| in (6, 8)) and just below powers of two
        np.concatenate([np.full(64, 7.5), np.nextafter(F32(4), F32(0)) * np.ones(64)]).astype(F32),
        np.concatenate([[2.0**-120, -(2.0**-125)], rng.standard_normal(126) * 2.0**-124]).astype(
            F32
        ),
        (rng.standard_normal(128) * 10).astype(F32),
        np.concatenate([[1e-3], np.full(127, 1e-9)]).astype(F32),
    ]
    flat = np.concatenate(blocks)
    need = int(np.prod(shape))
    reps = -(-need // flat.size)
    rolled = [np.roll(flat, 128 * r) for r in range(reps)]
    return np.concatenate(rolled)[:need].reshape(shape).astype(F32)


DATASETS = {
    "normal": random_normal,
    "heavy": heavy_tailed,
    "adversarial": adversarial,
    "adversarial_nohuge": lambda: adversarial(seed=3, huge=False),
    "odd_shape": lambda: heavy_tailed(ODD_SHAPE, seed=4),
}


# ------------------------------------------------- exact ties (x / scale exactly at a midpoint)
# These make every quotient an exact rounding tie, so any division that is not IEEE (e.g. XLA's
# multiplication by a rounded reciprocal) or any tie-breaking slip shows up as a changed code.

E2M1_MIDS = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], F32)


def _m16(rng, lo: int, hi: int, size=None) -> np.ndarray:
    """float32 with a 16-bit significand and exponent in [lo, hi)."""
    return (rng.integers(2**15, 2**16, size) * np.exp2(rng.integers(lo, hi, size) - 15.0)).astype(
        F32
    )


def nvfp4_ties(shape=SHAPE, seed: int = 20) -> tuple[np.ndarray, np.float32]:
    """(x, global_scale): E2M1 ties x / (bs*gs), and E4M3 ties block_amax / (6*gs)."""
    from tests.formats.numpy_reference import E4M3_GRID

    rng = np.random.default_rng(seed)
    gs = _m16(rng, -12, -8)
    blocks = rng.integers(0, 2, size=(*shape[:-1], shape[-1] // 16)).astype(bool)
    x = np.empty((*shape[:-1], shape[-1] // 16, 16), F32)
    bs = E4M3_GRID[rng.integers(8, 127, blocks.shape)].astype(F32)  # normal E4M3 values
    mids = rng.choice(E2M1_MIDS, x.shape) * rng.choice(np.array([-1, 1], F32), x.shape)
    x[...] = mids * bs[..., None] * gs
    x[..., 0] = 6 * bs * gs
    # the other half of the blocks: block_amax / (6 gs) is an E4M3 midpoint
    e4_mid = ((E4M3_GRID[8:126] + E4M3_GRID[9:127]) / 2).astype(F32)
    m = rng.choice(e4_mid, blocks.shape)
    tie_amax = (6 * m * gs).astype(F32)
    x[..., 0] = np.where(blocks, tie_amax, x[..., 0])
    x[..., 1:] = np.where(blocks[..., None], F32(0), x[..., 1:])
    return x.reshape(shape).astype(F32), gs


def mxfp4_ties(shape=SHAPE, seed: int = 21) -> np.ndarray:
    """Blocks whose shared exponent e is random and whose values are E2M1 ties times 2**e."""
    rng = np.random.default_rng(seed)
    x = np.empty((*shape[:-1], shape[-1] // 32, 32), F32)
    e = rng.integers(-100, 100, x.shape[:-1])[..., None].astype(np.float64)
    mids = rng.choice(E2M1_MIDS, x.shape) * rng.choice([-1.0, 1.0], x.shape)
    x[...] = mids * np.exp2(e)
    x[..., 0] = rng.choice([4.0, 7.5, -7.75], x.shape[:-1]) * np.exp2(e[..., 0])
    return x.reshape(shape).astype(F32)


def int_ties(bits: int, symmetric: bool, shape=SHAPE, group: int | None = 64, seed: int = 22):
    """Per group a float16 scale s hit exactly, and values (k + 1/2) * s (ties of x / s)."""
    rng = np.random.default_rng(seed + bits)
    g = shape[-1] if group is None else group
    x = np.empty((*shape[:-1], shape[-1] // g, g), F32)
    s = np.exp2(rng.uniform(-10, 6, x.shape[:-1])).astype(np.float16).astype(F32)[..., None]
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        k = rng.integers(-qmax, qmax, x.shape)
        x[...] = (k + 0.5) * s
        x[..., 0] = qmax * s[..., 0] * rng.choice([-1, 1], x.shape[:-1])
    else:
        qmax = 2**bits - 1
        a = rng.integers(0, qmax + 1, (*x.shape[:-1], 1))
        k = -a + rng.integers(0, qmax, x.shape)  # k + 1/2 in (-a, qmax - a)
        x[...] = (k + 0.5) * s
        x[..., 0] = -a[..., 0] * s[..., 0]
        x[..., 1] = (qmax - a[..., 0]) * s[..., 0]
    return x.reshape(shape).astype(F32)


def fp8_ties(shape=SHAPE, per_row: bool = True, seed: int = 23) -> np.ndarray:
    """amax = 448 s with s exact, values = E4M3 midpoints times s (ties of x / s)."""
    from tests.formats.numpy_reference import E4M3_GRID

    rng = np.random.default_rng(seed)
    mids = ((E4M3_GRID[1:] + E4M3_GRID[:-1]) / 2).astype(F32)
    rows = shape[:-1] if per_row else ()
    s = _m16(rng, -30, 10, rows)
    s = np.asarray(s, F32)[..., None] if per_row else np.full((1,) * len(shape), s, F32)
    x = rng.choice(mids, shape) * rng.choice([-1.0, 1.0], shape) * s
    x = x.astype(F32)
    if per_row:
        x[..., 0] = 448 * s[..., 0]
    else:
        x.flat[0] = 448 * s.flat[0]
    return x
