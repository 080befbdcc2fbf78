"""Integer formats int2..int8 (symmetric absmax) and int2_asym..int8_asym (zero point).

Scales are float16 (computed in float32, clamped to 65504, cast RNE) and quantization uses the
ROUNDED scale: s = float32(scale_f16). A scale that rounds to 0 encodes zero (all codes 0).
Rounding of x / s is round-half-to-even (jnp.round). Groups: 16, 32, 64 (default), 128, or the
whole last axis (group='channel' or None).

symmetric, qmax = 2**(k-1) - 1:  scale = amax / qmax;  q = clip(rne(x / s), -qmax, qmax);
  dequant q * s. Codes are k-bit two's complement, packed densely (int8 kept as int8 bytes).
asymmetric, qmax = 2**k - 1: lo = min(block_min, 0), hi = max(block_max, 0) (the range always
  contains 0, so zero is exact and the zero-point clip below never bites for finite scales);
  scale = (hi - lo) / qmax;  zp = clip(rne(-lo / s), 0, qmax);
  q = clip(rne(x / s) + zp, 0, qmax);  dequant (q - zp) * s. Codes unsigned k-bit, packed
  densely; zero points stored as uint8 per group.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pqjax.formats.base import Encoded, Format, absmax, exact_div, ftz, to_groups
from pqjax.formats.packing import pack_bits, sign_extend, unpack_bits
from pqjax.formats.registry import register

Array = jax.Array
F16_MAX = 65504.0
INT_GROUPS = (16, 32, 64, 128)
INT_BITS = (2, 3, 4, 5, 6, 7, 8)
DEFAULT_GROUP = 64


def int_qmax(bits: int, symmetric: bool = True) -> int:
    """Largest code magnitude: 2**(k-1) - 1 (symmetric) or 2**k - 1 (asymmetric)."""
    return (1 << (bits - 1)) - 1 if symmetric else (1 << bits) - 1


def f16_scale(numer: Array, qmax: int) -> Array:
    """float16 scale of float32 numer / qmax: clamp to 65504, then cast (RNE). (...) -> (...)."""
    s = ftz(exact_div(numer, np.float32(qmax)))
    return jnp.minimum(s, F16_MAX).astype(jnp.float16)


def int_sym_encode_values(x: Array, scale: Array, qmax: int) -> Array:
    """int8 codes clip(rne(x / s), -qmax, qmax), s = float32(scale_f16); s == 0 -> 0.

    x (..., g) float32, scale (..., 1) float16.
    """
    s = scale.astype(jnp.float32)
    ok = s > 0
    q = jnp.clip(jnp.round(exact_div(ftz(x), jnp.where(ok, s, 1.0))), -qmax, qmax)
    return jnp.where(ok, q, 0.0).astype(jnp.int8)


def int_sym_decode_values(codes: Array, scale: Array) -> Array:
    """float32 codes * float32(scale_f16) (exact: at most 8 x 11 significant bits)."""
    return codes.astype(jnp.float32) * scale.astype(jnp.float32)


def int_asym_params(lo: Array, hi: Array, qmax: int) -> tuple[Array, Array]:
    """(scale float16, zero_point uint8) from the group range [lo, hi] (lo <= 0 <= hi)."""
    scale = f16_scale(hi - lo, qmax)
    s = scale.astype(jnp.float32)
    ok = s > 0
    zp = jnp.clip(jnp.round(exact_div(-lo, jnp.where(ok, s, 1.0))), 0, qmax)
    return scale, jnp.where(ok, zp, 0.0).astype(jnp.uint8)


def int_asym_encode_values(x: Array, scale: Array, zero_point: Array, qmax: int) -> Array:
    """uint8 codes clip(rne(x / s) + zp, 0, qmax); s == 0 -> 0. scale/zp (..., 1)."""
    s = scale.astype(jnp.float32)
    ok = s > 0
    q = jnp.round(exact_div(ftz(x), jnp.where(ok, s, 1.0)))
    q = jnp.clip(q + zero_point.astype(jnp.float32), 0, qmax)
    return jnp.where(ok, q, 0.0).astype(jnp.uint8)


def int_asym_decode_values(codes: Array, scale: Array, zero_point: Array) -> Array:
    """(q - zp) * float32(scale_f16), float32 (exact)."""
    d = codes.astype(jnp.int32) - zero_point.astype(jnp.int32)
    return d.astype(jnp.float32) * scale.astype(jnp.float32)


def _normalize_group(bits: int, symmetric: bool, group: Any) -> int | None:
    if group is None or group == "channel":
        return None
    if isinstance(group, bool) or group not in INT_GROUPS:
        label = f"int{bits}" + ("" if symmetric else "_asym")
        valid = ", ".join(str(g) for g in INT_GROUPS)
        raise ValueError(
            f"{label}: group must be one of {valid}, 'channel' or None (whole last axis); "
            f"got {group!r}"
        )
    return int(group)


@dataclasses.dataclass(frozen=True)
class IntFormat(Format):
    """k-bit integer format with float16 scales, per group along the last axis.

    QTensor: codes uint8 (..., ceil(n_pad*k/8)) (int8 (..., n_pad) for k = 8 symmetric,
    uint8 for k = 8 asymmetric), block_scale float16 (..., G), zero_point uint8 (..., G)
    for the asymmetric variant. group None = one group over the whole last axis.
    """

    bits: int = 4
    group: int | None = DEFAULT_GROUP
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.bits not in INT_BITS:
            raise ValueError(f"integer formats have bits in {INT_BITS}, got {self.bits!r}")
        object.__setattr__(self, "group", _normalize_group(self.bits, self.symmetric, self.group))

    @property
    def name(self) -> str:
        return f"int{self.bits}" + ("" if self.symmetric else "_asym")

    @property
    def qmax(self) -> int:
        return int_qmax(self.bits, self.symmetric)

    def encode(self, x: Array) -> Encoded:
        xg = to_groups(x, self.group)
        if self.symmetric:
            scale = f16_scale(absmax(xg, axis=-1), self.qmax)
            codes = int_sym_encode_values(xg, scale[..., None], self.qmax)
            return Encoded(codes.reshape(*x.shape[:-1], -1), scale)
        # FTZ applied to the extremes equals the extremes of the flushed values
        lo = jnp.minimum(ftz(jnp.min(xg, axis=-1)), 0.0)
        hi = jnp.maximum(ftz(jnp.max(xg, axis=-1)), 0.0)
        scale, zp = int_asym_params(lo, hi, self.qmax)
        codes = int_asym_encode_values(xg, scale[..., None], zp[..., None], self.qmax)
        return Encoded(codes.reshape(*x.shape[:-1], -1), scale, None, zp)

    def decode(self, enc: Encoded) -> Array:
        scale = enc.block_scale
        cg = enc.codes.reshape(*scale.shape, -1)
        if self.symmetric:
            y = int_sym_decode_values(cg, scale[..., None])
        else:
            y = int_asym_decode_values(cg, scale[..., None], enc.zero_point[..., None])
        return y.reshape(*enc.codes.shape)

    def pack(self, codes: Array) -> Array:
        if self.bits == 8:
            return codes  # int8 / uint8 bytes as they are
        return pack_bits(codes, self.bits)

    def unpack(self, packed: Array, n_pad: int) -> Array:
        if self.bits == 8:
            return packed
        u = unpack_bits(packed, self.bits, n_pad)
        return sign_extend(u, self.bits) if self.symmetric else u


def _int_factory(bits: int, symmetric: bool) -> Any:
    def factory(group: Any = DEFAULT_GROUP, symmetric: bool = symmetric, **kw: Any) -> IntFormat:
        if kw:
            raise ValueError(
                f"int{bits}: unexpected options {sorted(kw)}; valid: group=, symmetric="
            )
        return IntFormat(bits=bits, group=group, symmetric=symmetric)

    return factory


for _k in INT_BITS:
    register(f"int{_k}", _int_factory(_k, True))
    register(f"int{_k}_asym", _int_factory(_k, False))
