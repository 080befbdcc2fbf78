"""Plain-numpy reference implementations of the pqjax number formats (does not import pqjax).

Each format follows its written definition with numpy float32 operations. Arithmetic model (the
same as pqjax's): IEEE float32 round-to-nearest-even, with every float32 result that is
subnormal flushed to zero of the same sign (`ftz` after each operation here).

Rounding onto the small grids has two independent back ends, chosen by `rounding=`:
  "grid":     nearest value of the grid built from the format definition, ties to the even
              code, saturating at the largest finite value (pure numpy, float64 distances);
  "ml_dtypes": casts to ml_dtypes.float4_e2m1fn / float8_e4m3fn of the scaled float32 values,
              after an explicit clip to +-max (ml_dtypes 0.6 saturates float4 casts but turns
              e4m3fn overflow into NaN; the clip makes both explicit).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

F32 = np.float32
F32_MAX = F32(np.finfo(np.float32).max)
TINY = F32(2.0**-126)
E2M1_GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float64)


def _e4m3_grid() -> np.ndarray:
    """The 127 non-negative finite E4M3 (fn) values, indexed by their code 0..126."""
    vals = []
    for code in range(127):  # 0x7F is NaN in the fn variant
        e, m = code >> 3, code & 7
        vals.append(m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return np.array(vals, np.float64)


E4M3_GRID = _e4m3_grid()


def ftz(a: np.ndarray) -> np.ndarray:
    """Float32 subnormals -> zero of the same sign."""
    a = np.asarray(a, F32)
    return np.where(np.abs(a) < TINY, np.copysign(F32(0), a), a).astype(F32)


def nearest_index(a: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Index of the grid value nearest to each a >= 0; ties to the even index; saturating."""
    a = np.asarray(a, np.float64)
    hi = np.clip(np.searchsorted(grid, a, side="left"), 1, len(grid) - 1)
    lo = hi - 1
    d_lo = a - grid[lo]
    d_hi = grid[hi] - a
    pick = np.where(d_hi < d_lo, hi, lo)
    pick = np.where(d_hi == d_lo, np.where(lo % 2 == 0, lo, hi), pick)
    return np.where(a >= grid[-1], len(grid) - 1, pick)


# ---------------------------------------------------------------- E2M1 / E4M3 / E8M0 elements


def e2m1_codes(v: np.ndarray, rounding: str = "grid") -> np.ndarray:
    """float32 -> uint8 E2M1 codes (bit 3 sign, bits 0-2 magnitude index), RNE, saturating."""
    v = np.asarray(v, F32)
    if rounding == "ml_dtypes":
        c = np.clip(v, F32(-6), F32(6)).astype(ml_dtypes.float4_e2m1fn)
        return c.view(np.uint8) & np.uint8(0x0F)
    idx = nearest_index(np.abs(v), E2M1_GRID).astype(np.uint8)
    return idx | (np.signbit(v).astype(np.uint8) << 3)


def e2m1_values(codes: np.ndarray) -> np.ndarray:
    """uint8 E2M1 codes -> float32 values (code 8 is -0.0)."""
    codes = np.asarray(codes, np.uint8)
    mag = E2M1_GRID[codes & 7].astype(F32)
    return np.where(codes & 8, -mag, mag).astype(F32)


def e4m3_round(a: np.ndarray, rounding: str = "grid") -> np.ndarray:
    """float32 -> float32 on the E4M3 grid: saturate at +-448, RNE. Input is flushed (FTZ)."""
    a = np.clip(ftz(a), F32(-448), F32(448))
    if rounding == "ml_dtypes":
        return a.astype(ml_dtypes.float8_e4m3fn).astype(F32)
    mag = E4M3_GRID[nearest_index(np.abs(a), E4M3_GRID)].astype(F32)
    return np.where(np.signbit(a), -mag, mag).astype(F32)


def floor_log2(a: np.ndarray) -> np.ndarray:
    """floor(log2(a)) for a > 0 via frexp (a = m * 2**ex, m in [0.5, 1))."""
    _, ex = np.frexp(np.asarray(a, np.float64))
    return ex.astype(np.int64) - 1


def e8m0_from_exponent(e: np.ndarray, rounding: str = "grid") -> np.ndarray:
    """Exponent in [-127, 127] -> float8_e8m0fnu."""
    e = np.asarray(e, np.int64)
    if rounding == "ml_dtypes":
        return np.exp2(e.astype(np.float64)).astype(ml_dtypes.float8_e8m0fnu)
    return (e + 127).astype(np.uint8).view(ml_dtypes.float8_e8m0fnu)


# -------------------------------------------------------------------------------- bit packing


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """(..., n) codes (low `bits` bits used) -> uint8 (..., ceil(n*bits/8)), little-endian."""
    c = np.asarray(codes).astype(np.int64) & ((1 << bits) - 1)
    bitplanes = np.unpackbits(c.astype(np.uint8)[..., None], axis=-1, bitorder="little")
    stream = bitplanes[..., :bits].reshape(*c.shape[:-1], c.shape[-1] * bits)
    return np.packbits(stream, axis=-1, bitorder="little")


def unpack(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack` -> uint8 (..., n)."""
    stream = np.unpackbits(np.asarray(packed, np.uint8), axis=-1, bitorder="little")
    planes = stream[..., : n * bits].reshape(*stream.shape[:-1], n, bits)
    return (planes.astype(np.uint8) << np.arange(bits, dtype=np.uint8)).sum(-1).astype(np.uint8)


# ---------------------------------------------------------------------------------- formats


def _groups(x: np.ndarray, g: int | None) -> np.ndarray:
    n = x.shape[-1]
    g = n if g is None else g
    n_pad = -(-n // g) * g
    xp = np.concatenate([x, np.zeros((*x.shape[:-1], n_pad - n), F32)], axis=-1)
    return xp.reshape(*x.shape[:-1], n_pad // g, g)


def _flat(y: np.ndarray) -> np.ndarray:
    return y.reshape(*y.shape[:-2], -1)


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """ftz(a / b) in float32, where b > 0 (other entries are garbage, masked by callers)."""
    with np.errstate(all="ignore"):
        return ftz(np.divide(a, np.where(b > 0, b, F32(1))).astype(F32))


def _mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        return ftz(np.multiply(a, b).astype(F32))


def nvfp4(x: np.ndarray, global_scale: float | None = None, rounding: str = "grid") -> dict:
    """NVFP4 reference: codes (packed uint8), block_scale (e4m3fn), global_scale (f32)."""
    x = ftz(x)
    if global_scale is None:
        gs = _div(np.max(np.abs(x)), F32(6 * 448))
    else:
        gs = ftz(F32(global_scale))
    xg = _groups(x, 16)
    denom6 = _mul(F32(6), gs)
    r = np.where(denom6 > 0, _div(np.max(np.abs(xg), axis=-1), denom6), F32(0))
    bs = e4m3_round(np.minimum(r, F32(448)), rounding)
    denom = _mul(bs, gs)[..., None]
    v = np.where(denom > 0, _div(xg, denom), np.copysign(F32(0), xg))
    return {
        "codes": pack(_flat(e2m1_codes(v, rounding)), 4),
        "block_scale": bs.astype(ml_dtypes.float8_e4m3fn),
        "global_scale": np.asarray(gs, F32),
    }


def nvfp4_dequantize(q: dict, n: int) -> np.ndarray:
    """(e2m1 * bs) * gs, FTZ, saturated to the float32 range; trimmed to n."""
    bs = q["block_scale"].astype(F32)
    v = e2m1_values(unpack(q["codes"], 4, bs.shape[-1] * 16)).reshape(*bs.shape, 16)
    dq = _mul(_mul(v, bs[..., None]), q["global_scale"])
    return _flat(np.clip(dq, -F32_MAX, F32_MAX))[..., :n]


def mxfp4(x: np.ndarray, rounding: str = "grid") -> dict:
    """MXFP4 reference: codes (packed uint8), block_scale (e8m0fnu)."""
    x = ftz(x)
    xg = _groups(x, 32)
    amax = np.max(np.abs(xg), axis=-1)
    with np.errstate(divide="ignore"):
        e = np.where(amax > 0, np.clip(floor_log2(amax) - 2, -127, 127), -127)
    scale = np.exp2(e.astype(np.float64))[..., None]  # exact in float64
    # one float64 division is exact; the cast to float32 is then the single correct rounding
    v = ftz((xg.astype(np.float64) / scale).astype(F32))
    return {
        "codes": pack(_flat(e2m1_codes(v, rounding)), 4),
        "block_scale": e8m0_from_exponent(e, rounding),
    }


def mxfp4_dequantize(q: dict, n: int) -> np.ndarray:
    """e2m1 * 2**e (exact in float64, one rounding to float32), FTZ; trimmed to n."""
    e = q["block_scale"].view(np.uint8).astype(np.int64) - 127
    v = e2m1_values(unpack(q["codes"], 4, e.shape[-1] * 32)).reshape(*e.shape, 32)
    dq = ftz((v.astype(np.float64) * np.exp2(e.astype(np.float64))[..., None]).astype(F32))
    return _flat(dq)[..., :n]


def _f16_scale(numer: np.ndarray, qmax: int) -> np.ndarray:
    s = _div(numer, F32(qmax))
    return np.minimum(s, F32(65504)).astype(np.float16)


def int_sym(x: np.ndarray, bits: int, group: int | None = 64) -> dict:
    """Symmetric k-bit integer reference: codes (packed, or int8 for k = 8), block_scale f16."""
    x = ftz(x)
    qmax = 2 ** (bits - 1) - 1
    xg = _groups(x, group)
    s16 = _f16_scale(np.max(np.abs(xg), axis=-1), qmax)
    s = s16.astype(F32)[..., None]
    q = np.where(s > 0, np.clip(np.rint(_div(xg, s)), -qmax, qmax), 0).astype(np.int8)
    codes = _flat(q)
    return {
        "codes": codes if bits == 8 else pack(codes.view(np.uint8), bits),
        "block_scale": s16,
    }


def int_sym_dequantize(q: dict, bits: int, n: int) -> np.ndarray:
    """q * float32(scale); codes sign-extended from their b-bit two's complement."""
    s = q["block_scale"].astype(F32)
    codes = q["codes"]
    if bits != 8:
        g_total = codes.shape[-1] * 8 // bits  # whole groups: the packed row is exact
        u = unpack(codes, bits, g_total).astype(np.int16)
        codes = np.where(u >= 2 ** (bits - 1), u - 2**bits, u).astype(np.int8)
    cg = codes.reshape(*s.shape, -1)
    return _flat(cg.astype(F32) * s[..., None])[..., :n]


def int_asym(x: np.ndarray, bits: int, group: int | None = 64) -> dict:
    """Asymmetric k-bit reference (range includes 0): codes, block_scale f16, zero_point u8."""
    x = ftz(x)
    qmax = 2**bits - 1
    xg = _groups(x, group)
    lo = np.minimum(np.min(xg, axis=-1), F32(0))
    hi = np.maximum(np.max(xg, axis=-1), F32(0))
    with np.errstate(over="ignore"):
        rng = ftz(hi - lo)
    s16 = _f16_scale(rng, qmax)
    s = s16.astype(F32)
    zp = np.where(s > 0, np.clip(np.rint(_div(-lo, s)), 0, qmax), 0)
    s, zpe = s[..., None], zp[..., None].astype(F32)
    q = np.where(s > 0, np.clip(np.rint(_div(xg, s)) + zpe, 0, qmax), 0).astype(np.uint8)
    codes = _flat(q)
    return {
        "codes": codes if bits == 8 else pack(codes, bits),
        "block_scale": s16,
        "zero_point": zp.astype(np.uint8),
    }


def int_asym_dequantize(q: dict, bits: int, n: int) -> np.ndarray:
    """(q - zp) * float32(scale)."""
    s = q["block_scale"].astype(F32)
    codes = q["codes"]
    if bits != 8:
        codes = unpack(codes, bits, codes.shape[-1] * 8 // bits)
    cg = codes.reshape(*s.shape, -1).astype(np.int64)
    d = (cg - q["zero_point"][..., None].astype(np.int64)).astype(F32)
    return _flat(d * s[..., None])[..., :n]


def fp8(
    x: np.ndarray, scaling: str = "tensor", scale: float | None = None, rounding: str = "grid"
) -> dict:
    """FP8 E4M3 reference: codes (float8_e4m3fn), block_scale (f32: () or (..., 1))."""
    x = ftz(x)
    if scale is not None:
        shape = () if scaling == "tensor" else (*x.shape[:-1], 1)
        s = np.broadcast_to(ftz(F32(scale)), shape).astype(F32)
    elif scaling == "tensor":
        s = _div(np.max(np.abs(x)), F32(448))
    else:
        s = _div(np.max(np.abs(x), axis=-1, keepdims=True), F32(448))
    v = np.where(s > 0, np.clip(_div(x, s), F32(-448), F32(448)), np.copysign(F32(0), x))
    c = e4m3_round(v, rounding)
    return {"codes": c.astype(ml_dtypes.float8_e4m3fn), "block_scale": np.asarray(s, F32)}


def fp8_dequantize(q: dict) -> np.ndarray:
    """float32(code) * scale, FTZ, saturated to the float32 range."""
    dq = _mul(q["codes"].astype(F32), q["block_scale"])
    return np.clip(dq, -F32_MAX, F32_MAX)


def quantize(name: str, x: np.ndarray, rounding: str = "grid", **kw) -> dict:
    """Quantize by pqjax format name (nvfp4, mxfp4, intK, intK_asym, fp8): stored arrays."""
    if name == "nvfp4":
        return nvfp4(x, kw.get("global_scale"), rounding)
    if name == "mxfp4":
        return mxfp4(x, rounding)
    if name == "fp8":
        return fp8(x, kw.get("scaling", "tensor"), kw.get("scale"), rounding)
    if name.startswith("int"):
        group = kw.get("group", 64)
        group = None if group == "channel" else group
        return (int_asym if name.endswith("_asym") else int_sym)(x, int(name[3]), group)
    raise ValueError(name)


def dequantize(name: str, q: dict, n: int) -> np.ndarray:
    """Dequantize the stored arrays of :func:`quantize` (last axis trimmed to n)."""
    if name == "nvfp4":
        return nvfp4_dequantize(q, n)
    if name == "mxfp4":
        return mxfp4_dequantize(q, n)
    if name == "fp8":
        return fp8_dequantize(q)
    if name.startswith("int"):
        bits = int(name[3])
        f = int_asym_dequantize if name.endswith("_asym") else int_sym_dequantize
        return f(q, bits, n)
    raise ValueError(name)


def reference(name: str, x: np.ndarray, rounding: str = "grid", **kw) -> dict:
    """quantize + dequantize: the stored arrays plus "dq", the dequantized float32 values."""
    q = quantize(name, x, rounding, **kw)
    return {**q, "dq": dequantize(name, q, np.shape(x)[-1])}
