"""FP8 E4M3 (float8_e4m3fn, max 448): the E4M3 rounding building block and the `fp8` format.

`fp8` scales: scale = amax / 448 (float32, stored as float32), codes = e4m3(clip(x / scale,
+-448)) with round-to-nearest-even. scaling="tensor" uses one amax for the whole tensor;
"token" and "channel" both mean one scale per vector along the last axis (per token for
activations (tokens, d_in); per output channel for weights passed as (d_out, d_in)).
A zero scale (all-zero vector, or amax/448 flushed as subnormal) encodes signed zeros.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pqjax.formats.base import (
    F32_MAX,
    Encoded,
    Format,
    absmax,
    bits_f32,
    check_finite_eager,
    exact_div,
    f32_bits,
    ftz,
    is_concrete,
    signed_zero,
)
from pqjax.formats.registry import register

Array = jax.Array
E4M3_MAX = 448.0
SCALINGS = ("tensor", "token", "channel")


def e4m3_round(x: Array) -> Array:
    """Round float32 (...) onto the E4M3 (fn) grid: RNE, saturating at +-448. -> float32 (...).

    Integer bit operations only (no fp8 casts), so kernels can reuse it. Float32 subnormal
    inputs count as signed zero (FTZ); the sign of zero is kept. NaN is not handled.
    """
    x = ftz(jnp.asarray(x, jnp.float32))
    b = f32_bits(x)
    sign = b & np.uint32(0x80000000)
    # saturate first (as the formats define), so no rounding can overflow to NaN
    a = jnp.minimum(bits_f32(b & np.uint32(0x7FFFFFFF)), E4M3_MAX)
    u = f32_bits(a)
    # normal E4M3 (a >= 2**-6): keep 3 of 23 mantissa bits, ties to even; a carry bumps the exponent
    lsb = (u >> 20) & np.uint32(1)
    normal = (u + np.uint32(0x7FFFF) + lsb) & np.uint32(0xFFF00000)
    # subnormal E4M3 (a < 2**-6): multiples of 2**-9. With s = 1.m * 2**23 the value is
    # s * 2**(e-23), so drop d = 14 - e low bits of s and round half to even
    e = (u >> 23).astype(jnp.int32) - 127
    s = (u & np.uint32(0x7FFFFF)) | np.uint32(0x800000)
    d = jnp.clip(14 - e, 1, 31).astype(jnp.uint32)
    q = s >> d
    rem = s & ((np.uint32(1) << d) - np.uint32(1))
    half = np.uint32(1) << (d - np.uint32(1))
    up = (rem > half) | ((rem == half) & ((q & np.uint32(1)) == 1))
    sub = (q + up.astype(jnp.uint32)).astype(jnp.float32) * np.float32(2.0**-9)
    r = jnp.where(e >= -6, bits_f32(normal), sub)
    return bits_f32(f32_bits(r) | sign)


def e4m3_encode(x: Array) -> Array:
    """float32 (...) -> float8_e4m3fn (...): e4m3_round, then an exact cast."""
    return e4m3_round(x).astype(jnp.float8_e4m3fn)


def fp8_scale(amax: Array) -> Array:
    """Per-vector scale amax / 448 in float32 (subnormal results flushed to zero)."""
    return ftz(exact_div(amax, np.float32(E4M3_MAX)))


def fp8_encode_values(x: Array, scale: Array) -> Array:
    """codes = e4m3(clip(ftz(x) / scale, +-448)); zero scale -> signed zero. -> float8_e4m3fn."""
    x = ftz(x)
    ok = scale > 0
    v = jnp.clip(exact_div(x, jnp.where(ok, scale, 1.0)), -E4M3_MAX, E4M3_MAX)
    return e4m3_encode(jnp.where(ok, v, signed_zero(x)))


def fp8_decode_values(codes: Array, scale: Array) -> Array:
    """float8_e4m3fn codes times float32 scale -> float32 (FTZ, saturated to the float32 range)."""
    return jnp.clip(ftz(codes.astype(jnp.float32) * scale), -F32_MAX, F32_MAX)


@dataclasses.dataclass(frozen=True)
class FP8(Format):
    """FP8 E4M3 with float32 scales. scaling: 'tensor' | 'token' | 'channel'.

    quantize(x, scale=None): a given (calibrated, static) scale must be positive and
    broadcastable to the scale shape, () for 'tensor' or (..., 1) otherwise.
    QTensor: codes float8_e4m3fn (...x.shape), block_scale float32 of that scale shape.
    """

    scaling: str = "tensor"

    def __post_init__(self) -> None:
        if self.scaling not in SCALINGS:
            raise ValueError(f"fp8: scaling must be one of {SCALINGS}, got {self.scaling!r}")

    @property
    def name(self) -> str:
        return "fp8"

    @property
    def group_size(self) -> int | None:
        return None

    def check_kwargs(self, kwargs: dict[str, Any]) -> None:
        extra = set(kwargs) - {"scale"}
        if extra:
            raise TypeError(f"fp8: unexpected quantize arguments {sorted(extra)}")
        scale = kwargs.get("scale")
        if scale is not None:
            check_finite_eager(jnp.asarray(scale, jnp.float32), "fp8 (scale)")
            if is_concrete(scale) and bool(jnp.any(jnp.asarray(scale) <= 0)):
                raise ValueError("fp8: an explicit scale must be positive")

    def encode(self, x: Array, scale: Array | None = None) -> Encoded:
        if scale is None:
            if self.scaling == "tensor":
                amax = absmax(x)
            else:
                amax = absmax(x, axis=-1, keepdims=True)
            s = fp8_scale(amax)
        else:
            shape = () if self.scaling == "tensor" else (*x.shape[:-1], 1)
            s = ftz(jnp.broadcast_to(jnp.asarray(scale, jnp.float32), shape))
        return Encoded(fp8_encode_values(x, s), s)

    def decode(self, enc: Encoded) -> Array:
        return fp8_decode_values(enc.codes, enc.block_scale)

    def pack(self, codes: Array) -> Array:
        return codes  # float8_e4m3fn is already one byte per element

    def unpack(self, packed: Array, n_pad: int) -> Array:
        return packed


@register("fp8")
def _fp8(scaling: str = "tensor", **kwargs: Any) -> FP8:
    if kwargs:
        raise ValueError(
            f"fp8 takes only scaling= ('tensor' | 'token' | 'channel'), got {sorted(kwargs)}; "
            "it has no group size"
        )
    return FP8(scaling=scaling)
