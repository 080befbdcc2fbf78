"""QuaRTZ (Kim et al., 2025): 8-bit min-max quantization, then leading-zero suppression to 4 bits.

    fmt = formats.get("quartz")                    # 4-bit codes; "quartz3": 3-bit codes
    qt = fmt.quantize(x)                           # x (..., n) -> QTensor, qt.bits_per_element

Two granularities, because one would be degenerate: if the INT8 scale and the leading-zero
count shared a group, that group's largest code would always be 127, every shift would be 4,
and the format would be plain INT4 (step 16/127 of the group's range) after an extra rounding.
So:

1. INT8, symmetric min-max (the range is max |x|, so the outliers set it and are kept), per
   `group` channels (None: one scale per row, i.e. per token / per output channel); float16
   scale s and codes q8 = clip(rne(x / s), -127, 127) exactly as the int8 format does.
2. Leading-zero suppression per `subgroup` (16) consecutive codes: with L = bit length of the
   subgroup's largest |q8| (the shared leading-zero count is 7 - L), the subgroup keeps the
   m = bits - 1 magnitude bits [L - m, L) of each |q8|; shift = max(L - m, 0) in [0, 8 - bits].
   Dense small values (L <= m) keep every bit of their INT8 code (the LSBs the abstract keeps);
   only subgroups holding large values lose low bits.
3. Residual truncation: the bits below the kept window (the residual) are dropped, and the
   window is ROUNDED, half away from zero: |c| = min((|q8| + 2^(shift-1)) >> shift, 2^m - 1)
   (one adder before the shift; a carry out of the window saturates instead of renormalising
   the shift). Why rounding: the abstract claims QuaRTZ "reduces rounding errors" relative to
   4-bit quantization, and a plain floor (|c| = |q8| >> shift, names "quartz_trunc",
   "quartz3_trunc", kept for ablation) cannot: it is biased toward zero with 4x the error
   variance of rounding, measured 4x the W4A4 error of rounding on Gaussian layers, worse
   than int4 g64 (tests/baselines/test_quartz.py). "Retain LSBs" is the leading-zero
   suppression of step 2, not the rounding mode.
   Code c = sign(q8) |c| in [-(2^m - 1), 2^m - 1] (no negative zero).

Dequantized value: c * 2^shift * float32(s), exact in float32 (at most 7 + 11 significant bits).

Storage (QTensor): codes uint8 (..., ceil(n_pad bits / 8) + ceil(S * 3 / 8)), per row the
`bits`-bit two's-complement codes packed densely (packing.py), then the S = n_pad / subgroup
3-bit shifts packed the same way; block_scale float16 (..., G), one INT8 scale per group.
Bits per element: bits + 3 / subgroup + 16 / group (+ packing round-up), e.g. 4.19 for "quartz"
on a 3072-wide row (4 + 0.1875 + 0.005) vs 4.25 for int4 g64 and 4.5 for nvfp4.
n is zero-padded to a multiple of the group (of the subgroup when group is None).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from pqjax.formats.base import Encoded, Format, absmax, to_groups
from pqjax.formats.integer import f16_scale, int_sym_encode_values
from pqjax.formats.packing import pack_bits, packed_len, sign_extend, unpack_bits
from pqjax.formats.registry import register

Array = jax.Array
QUARTZ_BITS = (2, 3, 4)
SUBGROUPS = (8, 16, 32, 64)
SHIFT_BITS = 3  # shifts lie in [0, 8 - bits] <= 6
ROUNDINGS = ("nearest", "trunc")
INT8_QMAX = 127


def bit_length(m: Array) -> Array:
    """Bit length of non-negative int32 m (0 for 0): 32 - clz(m). (...) -> int32 (...)."""
    return 32 - lax.clz(m.astype(jnp.int32))


def lzs_shift(mag: Array, bits: int) -> Array:
    """Per-subgroup shift from int32 magnitudes (..., S, sg) -> int32 (..., S)."""
    return jnp.maximum(bit_length(jnp.max(mag, axis=-1)) - (bits - 1), 0)


def lzs_encode(q8: Array, shift: Array, bits: int, rounding: str) -> Array:
    """INT8 codes (..., S, sg) and shifts (..., S) -> int8 codes (..., S, sg) of `bits` bits."""
    mag = jnp.abs(q8.astype(jnp.int32))
    k = shift[..., None]
    if rounding == "nearest":
        c = jnp.minimum((mag + ((1 << k) >> 1)) >> k, (1 << (bits - 1)) - 1)
    else:
        c = mag >> k
    return jnp.where(q8 < 0, -c, c).astype(jnp.int8)


@dataclasses.dataclass(frozen=True)
class QuartzFormat(Format):
    """QuaRTZ: INT8 per `group` (None: whole row), `bits`-bit codes per `subgroup` shift.

    See the module docstring for the encoding and the QTensor layout.
    """

    bits: int = 4
    group: int | None = None
    subgroup: int = 16
    rounding: str = "nearest"

    def __post_init__(self) -> None:
        if self.bits not in QUARTZ_BITS:
            raise ValueError(f"quartz: bits must be one of {QUARTZ_BITS}, got {self.bits!r}")
        if self.subgroup not in SUBGROUPS:
            raise ValueError(f"quartz: subgroup must be one of {SUBGROUPS}, got {self.subgroup!r}")
        if self.group == "channel":
            object.__setattr__(self, "group", None)
        g = self.group
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g % self.subgroup):
            raise ValueError(
                f"quartz: group (the INT8 scale group) must be None or a positive multiple of "
                f"subgroup={self.subgroup}, got {g!r}"
            )
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"quartz: rounding must be one of {ROUNDINGS}, got {self.rounding!r}")

    @property
    def name(self) -> str:
        return _name(self.bits, self.rounding)

    @property
    def group_size(self) -> int:
        """The leading-zero subgroup: the finest run of channels sharing a scale s * 2^shift."""
        return self.subgroup

    def padded_len(self, n: int) -> int:
        unit = self.subgroup if self.group is None else self.group
        return -(-n // unit) * unit

    def encode(self, x: Array) -> Encoded:
        """x (..., n) -> codes int8 (..., n_pad + S) (the codes, then the S shifts), f16 scales."""
        n_pad = self.padded_len(x.shape[-1])
        if n_pad != x.shape[-1]:
            x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n_pad - x.shape[-1])])
        xg = to_groups(x, self.group)  # (..., G, g)
        scale = f16_scale(absmax(xg, axis=-1), INT8_QMAX)
        q8 = int_sym_encode_values(xg, scale[..., None], INT8_QMAX)
        q8 = q8.reshape(*x.shape[:-1], n_pad // self.subgroup, self.subgroup)
        shift = lzs_shift(jnp.abs(q8.astype(jnp.int32)), self.bits)
        codes = lzs_encode(q8, shift, self.bits, self.rounding).reshape(*x.shape[:-1], n_pad)
        return Encoded(jnp.concatenate([codes, shift.astype(jnp.int8)], axis=-1), scale)

    def _split(self, codes: Array) -> tuple[Array, Array]:
        """(..., n_pad + S) -> codes (..., n_pad), shifts (..., S)."""
        n_pad = codes.shape[-1] * self.subgroup // (self.subgroup + 1)
        return codes[..., :n_pad], codes[..., n_pad:]

    def decode(self, enc: Encoded) -> Array:
        codes, shift = self._split(enc.codes)
        n_pad = codes.shape[-1]
        c = codes.reshape(*codes.shape[:-1], n_pad // self.subgroup, self.subgroup)
        v = c.astype(jnp.int32) << shift.astype(jnp.int32)[..., None]  # |v| <= 127: exact
        s = enc.block_scale.astype(jnp.float32)
        per_group = n_pad // s.shape[-1]
        v = v.reshape(*codes.shape[:-1], s.shape[-1], per_group).astype(jnp.float32)
        return (v * s[..., None]).reshape(*codes.shape)

    def pack(self, codes: Array) -> Array:
        c, shift = self._split(codes)
        return jnp.concatenate([pack_bits(c, self.bits), pack_bits(shift, SHIFT_BITS)], axis=-1)

    def unpack(self, packed: Array, n_pad: int) -> Array:
        n_code = packed_len(n_pad, self.bits)
        c = sign_extend(unpack_bits(packed[..., :n_code], self.bits, n_pad), self.bits)
        s = unpack_bits(packed[..., n_code:], SHIFT_BITS, n_pad // self.subgroup)
        return jnp.concatenate([c, s.astype(jnp.int8)], axis=-1)


def _name(bits: int, rounding: str) -> str:
    return "quartz" + ("" if bits == 4 else str(bits)) + ("_trunc" if rounding == "trunc" else "")


def _quartz_factory(bits: int, rounding: str) -> Any:
    def factory(
        group: Any = None, subgroup: int = 16, rounding: str = rounding, **kw: Any
    ) -> QuartzFormat:
        if kw:
            raise ValueError(
                f"{_name(bits, rounding)}: unexpected options {sorted(kw)}; "
                "valid: group=, subgroup=, rounding="
            )
        return QuartzFormat(bits=bits, group=group, subgroup=subgroup, rounding=rounding)

    return factory


for _b in (4, 3):
    for _r in ROUNDINGS:
        register(_name(_b, _r), _quartz_factory(_b, _r))

__all__ = ["QuartzFormat", "bit_length", "lzs_encode", "lzs_shift"]
