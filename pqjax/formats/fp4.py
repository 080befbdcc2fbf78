"""FP4 E2M1 building blocks and the `nvfp4` and `mxfp4` formats.

E2M1 code = 4-bit pattern: bit 3 sign, bits 0-2 the magnitude index 0..7 of
{0, 0.5, 1, 1.5, 2, 3, 4, 6}. Rounding is to nearest, ties to the even index (= even mantissa
bit), saturating at 6 (also for inf). The sign of zero is kept: -0.0 and tiny negatives give
code 0b1000 (-0), as an IEEE-style cast would.

nvfp4 (group 16): global scale gs = ftz(amax / 2688) (float32, 2688 = 6*448), or a given one.
  block scale bs = e4m3(min(block_amax / (6 * gs), 448)), stored as float8_e4m3fn;
  denom = ftz(float32(bs) * gs); code = e2m1(x / denom); denom == 0 (all-zero tensor or block,
  or bs rounding to 0 in E4M3, or gs == 0) encodes signed zeros.
  dequant = clip(ftz((e2m1 * float32(bs)) * gs), +-float32 max)  (e2m1 * bs is exact).
mxfp4 (group 32, OCP MX v1.0): e = clip(floor_log2(block_amax) - 2, -127, 127) (exact, from the
  float bits), stored as float8_e8m0fnu (bits e + 127); an all-zero block gets e = -127.
  code = e2m1(x * 2**-e); dequant = ftz(e2m1 * 2**e).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pqjax.formats.base import (
    F32_MAX,
    Encoded,
    Format,
    absmax,
    bits_f32,
    check_finite_eager,
    exact_div,
    f32_bits,
    floor_log2,
    ftz,
    is_concrete,
    mul_pow2,
    signed_zero,
    to_groups,
)
from pqjax.formats.fp8 import E4M3_MAX, e4m3_round
from pqjax.formats.packing import pack_bits, unpack_bits
from pqjax.formats.registry import register

Array = jax.Array
E2M1_MAX = 6.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
NVFP4_GROUP = 16
MXFP4_GROUP = 32
E8M0_MIN, E8M0_MAX = -127, 127

# (threshold, strict): |v| passes to the next grid index when |v| > t (strict, the tie goes to
# the even index below) or |v| >= t (the tie goes up to the even index above)
_E2M1_STEPS = (
    (0.25, True),
    (0.75, False),
    (1.25, True),
    (1.75, False),
    (2.5, True),
    (3.5, False),
    (5.0, True),
)


def e2m1_encode(v: Array) -> Array:
    """float32 (...) -> uint8 E2M1 codes (...): RNE onto the grid, saturating at +-6."""
    v = jnp.asarray(v, jnp.float32)
    a = jnp.abs(v)
    idx = jnp.zeros(v.shape, jnp.int32)  # int32 sums vectorize better on CPU than uint8
    for t, strict in _E2M1_STEPS:
        idx = idx + ((a > t) if strict else (a >= t)).astype(jnp.int32)
    sign = (f32_bits(v) >> 31).astype(jnp.int32)
    return (idx | (sign << 3)).astype(jnp.uint8)


def e2m1_decode(codes: Array) -> Array:
    """uint8 E2M1 codes (...) -> float32 values (...), built from the bits (no table lookup)."""
    c = jnp.asarray(codes).astype(jnp.uint32)
    e = (c >> 1) & np.uint32(3)
    m = c & np.uint32(1)
    # exponent field e > 0: 2**(e-1) * (1 + m/2); e == 0: m * 0.5 (0.5 has float32 exponent 126)
    normal = ((e + np.uint32(126)) << 23) | (m << 22)
    mag = jnp.where(e == 0, m * np.uint32(126 << 23), normal)
    return bits_f32(mag | ((c >> 3) << 31))


def e2m1_round(v: Array) -> Array:
    """float32 (...) -> float32 (...) on the E2M1 grid (RNE, saturating, sign of zero kept)."""
    return e2m1_decode(e2m1_encode(v))


def nvfp4_global_scale(x: Array) -> Array:
    """Per-tensor NVFP4 global scale ftz(amax / (6*448)), float32 scalar."""
    amax = absmax(jnp.asarray(x, jnp.float32))
    return ftz(exact_div(amax, np.float32(E2M1_MAX * E4M3_MAX)))


def nvfp4_block_scale(block_amax: Array, global_scale: Array) -> Array:
    """E4M3 block scale, as float32 on the E4M3 grid: e4m3(min(block_amax / (6*gs), 448)).

    block_amax (...) float32, global_scale scalar (or broadcastable); gs == 0 gives 0.
    """
    denom6 = np.float32(E2M1_MAX) * global_scale
    ok = denom6 > 0
    r = jnp.where(ok, exact_div(block_amax, jnp.where(ok, denom6, 1.0)), 0.0)
    return e4m3_round(jnp.minimum(r, E4M3_MAX))


def nvfp4_encode_values(x: Array, block_scale: Array, global_scale: Array) -> Array:
    """E2M1 codes of ftz(x) / ftz(float32(block_scale) * gs); zero denominator -> signed zero.

    x (..., g) float32; block_scale (..., 1) float32 on the E4M3 grid; gs scalar.
    """
    x = ftz(x)
    denom = ftz(block_scale * global_scale)
    ok = denom > 0
    v = jnp.where(ok, exact_div(x, jnp.where(ok, denom, 1.0)), signed_zero(x))
    return e2m1_encode(v)


def nvfp4_decode_values(codes: Array, block_scale: Array, global_scale: Array) -> Array:
    """(e2m1(codes) * float32(bs)) * gs, flushed and saturated to the float32 range."""
    y = (e2m1_decode(codes) * block_scale) * global_scale
    return jnp.clip(ftz(y), -F32_MAX, F32_MAX)


def e8m0_exponent(block_amax: Array) -> Array:
    """MX shared exponent clip(floor(log2(amax)) - 2, -127, 127), int32; amax == 0 -> -127."""
    return jnp.clip(floor_log2(block_amax) - 2, E8M0_MIN, E8M0_MAX)


def e8m0_from_exponent(e: Array) -> Array:
    """int32 exponent in [-127, 127] -> float8_e8m0fnu (bits e + 127)."""
    return lax.bitcast_convert_type((e + 127).astype(jnp.uint8), jnp.float8_e8m0fnu)


def e8m0_to_exponent(s: Array) -> Array:
    """float8_e8m0fnu -> int32 exponent (bits - 127)."""
    return lax.bitcast_convert_type(s, jnp.uint8).astype(jnp.int32) - 127


def mxfp4_encode_values(x: Array, exponent: Array) -> Array:
    """E2M1 codes of ftz(x) * 2**-e (== x / 2**e exactly). x (..., g), exponent (..., 1) int32."""
    return e2m1_encode(mul_pow2(ftz(x), -exponent))


def mxfp4_decode_values(codes: Array, exponent: Array) -> Array:
    """e2m1(codes) * 2**e, float32 (FTZ)."""
    return mul_pow2(e2m1_decode(codes), exponent)


class _FP4Format(Format):
    """Shared packing of E2M1 codes: two per byte, element 0 in the low nibble."""

    def pack(self, codes: Array) -> Array:
        return pack_bits(codes, 4)

    def unpack(self, packed: Array, n_pad: int) -> Array:
        return unpack_bits(packed, 4, n_pad)


@dataclasses.dataclass(frozen=True)
class NVFP4(_FP4Format):
    """NVFP4: E2M1 codes, float8_e4m3fn scale per 16 elements, float32 global scale.

    quantize(x, global_scale=None): None computes amax/2688 from x; a given (calibrated) scale
    must be a finite float >= 0. QTensor: codes uint8 (..., n_pad/2), block_scale
    float8_e4m3fn (..., n_pad/16), global_scale float32 ().
    """

    group: int = NVFP4_GROUP

    def __post_init__(self) -> None:
        if self.group != NVFP4_GROUP:
            raise ValueError(
                f"nvfp4 allows only group {NVFP4_GROUP} (one E4M3 scale per 16 elements), "
                f"got {self.group!r}"
            )

    @property
    def name(self) -> str:
        return "nvfp4"

    def check_kwargs(self, kwargs: dict[str, Any]) -> None:
        extra = set(kwargs) - {"global_scale"}
        if extra:
            raise TypeError(f"nvfp4: unexpected quantize arguments {sorted(extra)}")
        gs = kwargs.get("global_scale")
        if gs is not None:
            gs = jnp.asarray(gs, jnp.float32)
            if gs.ndim != 0:
                raise ValueError(f"nvfp4: global_scale must be a scalar, got shape {gs.shape}")
            check_finite_eager(gs, "nvfp4 (global_scale)")
            if is_concrete(gs) and bool(gs < 0):
                raise ValueError("nvfp4: global_scale must be >= 0")

    def encode(self, x: Array, global_scale: Array | None = None) -> Encoded:
        if global_scale is None:
            gs = nvfp4_global_scale(x)
        else:
            gs = ftz(jnp.asarray(global_scale, jnp.float32))
        xg = to_groups(x, self.group)
        bs = nvfp4_block_scale(absmax(xg, axis=-1), gs)
        codes = nvfp4_encode_values(xg, bs[..., None], gs)
        codes = codes.reshape(*x.shape[:-1], -1)
        return Encoded(codes, bs.astype(jnp.float8_e4m3fn), gs)

    def decode(self, enc: Encoded) -> Array:
        bs = enc.block_scale.astype(jnp.float32)
        cg = enc.codes.reshape(*bs.shape, self.group)
        y = nvfp4_decode_values(cg, bs[..., None], enc.global_scale)
        return y.reshape(*enc.codes.shape)


@dataclasses.dataclass(frozen=True)
class MXFP4(_FP4Format):
    """MXFP4 (OCP MX v1.0): E2M1 codes, float8_e8m0fnu shared scale per 32 elements.

    QTensor: codes uint8 (..., n_pad/2), block_scale float8_e8m0fnu (..., n_pad/32).
    """

    group: int = MXFP4_GROUP

    def __post_init__(self) -> None:
        if self.group != MXFP4_GROUP:
            raise ValueError(
                f"mxfp4 allows only group {MXFP4_GROUP} (one E8M0 scale per 32 elements), "
                f"got {self.group!r}"
            )

    @property
    def name(self) -> str:
        return "mxfp4"

    def encode(self, x: Array) -> Encoded:
        xg = to_groups(x, self.group)
        e = e8m0_exponent(absmax(xg, axis=-1))
        codes = mxfp4_encode_values(xg, e[..., None]).reshape(*x.shape[:-1], -1)
        return Encoded(codes, e8m0_from_exponent(e))

    def decode(self, enc: Encoded) -> Array:
        e = e8m0_to_exponent(enc.block_scale)
        cg = enc.codes.reshape(*e.shape, self.group)
        return mxfp4_decode_values(cg, e[..., None]).reshape(*enc.codes.shape)


def _fixed_group_factory(cls: type, default: int) -> Any:
    def factory(group: Any = default, **kwargs: Any) -> Format:
        if kwargs:
            raise ValueError(f"{cls.__name__.lower()}: unexpected options {sorted(kwargs)}")
        return cls(group=group)

    return factory


register("nvfp4", _fixed_group_factory(NVFP4, NVFP4_GROUP))
register("mxfp4", _fixed_group_factory(MXFP4, MXFP4_GROUP))
