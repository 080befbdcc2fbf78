"""Number-format arithmetic inside Pallas kernels: Triton on GPU, interpret mode on CPU.

The quantizers below are the programs of `pqjax.formats`, step for step (same operations, same
order, same explicit flushes to zero), applied to one row held as a tile `(Gp, H)`: Gp groups
(padded to a power of two) of H >= group elements, group reductions along axis 1. Two things
differ from the formats' own code, because a kernel cannot use them:

* division: `formats.exact_div` relies on an XLA optimization barrier. In a Triton kernel
  `lax.div` lowers to `div.full.f32` (approximate, up to 2 ulp), so `div_rn` uses the PTX
  instruction `div.rn.f32` (IEEE, correctly rounded, subnormals kept; the formats' explicit
  `ftz` calls then flush what they flush on CPU). In interpret mode the kernel body runs
  through XLA, whose simplifier turns `a / broadcast(b)` into `a * (1/b)`: the same
  optimization barrier as `exact_div` prevents that;
* `jnp.round` has no Triton lowering: `rne` rounds with the 1.5 * 2**23 trick, exact for
  |v| < 2**22, and the quantizers clip before rounding (which does not change the result).
  XLA folds (v + c) - c into v, so in interpret mode a barrier separates the two steps (LLVM,
  under Triton, does not reassociate float additions).

Block scales leave the kernels as raw bits (uint8 for E4M3 / E8M0; float16 for INT scales),
so no kernel needs an fp8 conversion (Ampere has none); wrappers bitcast them for free.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.pallas import triton as plgpu

from pqjax import formats
from pqjax.formats.base import bits_f32, f32_bits, ftz, signed_zero
from pqjax.formats.fp4 import MXFP4, NVFP4, e2m1_decode, e2m1_encode, e8m0_to_exponent
from pqjax.formats.fp8 import E4M3_MAX, e4m3_round
from pqjax.formats.integer import F16_MAX, IntFormat

Array = jax.Array
_RNE_MAGIC = np.float32(1.5 * 2**23)
FP8_SPAN = 14  # block exponents of a row may span this many binades on the FP8 path


def compiler_params(num_warps: int, num_stages: int) -> object:
    """Triton compiler parameters (named TritonCompilerParams before jax 0.7)."""
    cls = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams
    return cls(num_warps=num_warps, num_stages=num_stages)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (>= 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """What a kernel can write: 'nvfp4' | 'mxfp4' | 'int4' (symmetric or not), and the group.

    group None means one group over the whole row (INT formats only).
    """

    kind: str
    group: int | None
    symmetric: bool = True

    @staticmethod
    def from_format(fmt: formats.Format) -> QuantSpec:
        """The spec of a `pqjax.formats` format; NotImplementedError names what is missing."""
        if isinstance(fmt, NVFP4):
            return QuantSpec("nvfp4", fmt.group)
        if isinstance(fmt, MXFP4):
            return QuantSpec("mxfp4", fmt.group)
        if isinstance(fmt, IntFormat) and fmt.bits == 4:
            return QuantSpec("int4", fmt.group, fmt.symmetric)
        raise NotImplementedError(
            f"the fused kernels write nvfp4, mxfp4 and int4 (sym/asym); not {fmt.name}"
            + (f" with {fmt.bits} bits" if isinstance(fmt, IntFormat) else "")
        )

    def group_len(self, d: int) -> int:
        return d if self.group is None else self.group

    def padded_len(self, d: int) -> int:
        g = self.group_len(d)
        return -(-d // g) * g

    @property
    def scale_dtype(self) -> jnp.dtype:
        """dtype the kernel stores the block scale in (bits for the fp8 scales)."""
        return jnp.dtype(jnp.float16 if self.kind == "int4" else jnp.uint8)


def div_rn(a: Array, b: Array, *, interpret: bool) -> Array:
    """Correctly rounded float32 a / b (IEEE RNE), broadcast; see the module docstring."""
    shape = jnp.broadcast_shapes(jnp.shape(a), jnp.shape(b))
    a = jnp.broadcast_to(jnp.asarray(a, jnp.float32), shape)
    b = jnp.broadcast_to(jnp.asarray(b, jnp.float32), shape)
    if interpret:
        return a / lax.optimization_barrier(b)
    [q] = plgpu.elementwise_inline_asm(
        "div.rn.f32 $0, $1, $2;",
        args=[a, b],
        constraints="=f,f,f",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(shape, jnp.float32)],
    )
    return q


def rne(v: Array, *, interpret: bool) -> Array:
    """Round float32 to the nearest integer, ties to even, for |v| < 2**22 (= jnp.round)."""
    big = v + _RNE_MAGIC
    return (lax.optimization_barrier(big) if interpret else big) - _RNE_MAGIC


def round_clip(v: Array, lo: float, hi: float, *, interpret: bool) -> Array:
    """clip(rne(v), lo, hi) for any finite v: clipping to [lo-1, hi+1] first changes nothing."""
    return jnp.clip(rne(jnp.clip(v, lo - 1.0, hi + 1.0), interpret=interpret), lo, hi)


def floor_log2_normal(a: Array) -> Array:
    """floor(log2 a) for float32 a that is normal or zero (zero -> -150, as formats.floor_log2)."""
    b = f32_bits(a) & np.uint32(0x7FFFFFFF)
    return jnp.where(b == 0, -150, (b >> 23).astype(jnp.int32) - 127)


def e4m3_to_bits(v: Array) -> Array:
    """float32 values on the E4M3 grid (|v| <= 448) -> uint8 float8_e4m3fn bit patterns."""
    u = f32_bits(v)
    sign = (u >> 24) & np.uint32(0x80)
    a = u & np.uint32(0x7FFFFFFF)
    e = (a >> 23).astype(jnp.int32) - 127
    normal = ((e + 7).astype(jnp.uint32) << 3) | ((a >> 20) & np.uint32(7))
    # E4M3 subnormals are m * 2**-9, m = 0..7 (the product is an exact small integer)
    sub = (bits_f32(a) * np.float32(512.0)).astype(jnp.int32).astype(jnp.uint32)
    return (jnp.where(e >= -6, normal, sub) | sign).astype(jnp.uint8)


def e4m3_from_bits(b: Array) -> Array:
    """uint8 float8_e4m3fn bit patterns (no NaN) -> float32, exactly."""
    b = b.astype(jnp.uint32)
    e = (b >> 3) & np.uint32(0xF)
    m = b & np.uint32(7)
    normal = bits_f32(((e + np.uint32(120)) << 23) | (m << 20))
    mag = jnp.where(e == 0, m.astype(jnp.float32) * np.float32(2.0**-9), normal)
    return bits_f32(f32_bits(mag) | ((b >> 7) << 31))


def pow2_exact(e: Array) -> Array:
    """2**e as float32 for int32 e in [-126, 127] (bits; clamped outside)."""
    e = jnp.clip(e, -126, 127)
    return bits_f32((e + 127).astype(jnp.uint32) << 23)


def mul_pow2(x: Array, e: Array) -> Array:
    """ftz(x * 2**e) for e in [-252, 254], as formats.mul_pow2 (two normal factors)."""
    e1 = jnp.clip(e, -126, 127)
    return ftz((x * pow2_exact(e1)) * pow2_exact(e - e1))


def quantize_tile(
    y: Array, spec: QuantSpec, gs: Array | None, *, interpret: bool
) -> tuple[Array, Array, Array | None]:
    """Quantize a row tile y `(Gp, H)` float32 (zeros where padded) group by group (axis 1).

    Returns (codes `(Gp, H)` uint8 4-bit patterns, scale `(Gp,)` (uint8 bits or float16),
    zero point `(Gp,)` uint8 or None). gs: the NVFP4 global scale (flushed) as a scalar.
    """
    if spec.kind == "nvfp4":
        amax = ftz(jnp.max(jnp.abs(y), axis=1))
        denom6 = np.float32(6.0) * gs
        ok = denom6 > 0
        r = jnp.where(ok, div_rn(amax, jnp.where(ok, denom6, 1.0), interpret=interpret), 0.0)
        bs = e4m3_round(jnp.minimum(r, E4M3_MAX))
        denom = ftz(bs * gs)
        okd = (denom > 0)[:, None]
        den = jnp.where(okd, denom[:, None], 1.0)
        v = jnp.where(okd, div_rn(ftz(y), den, interpret=interpret), signed_zero(y))
        return e2m1_encode(v), e4m3_to_bits(bs), None
    if spec.kind == "mxfp4":
        amax = ftz(jnp.max(jnp.abs(y), axis=1))
        e = jnp.clip(floor_log2_normal(amax) - 2, -127, 127)
        codes = e2m1_encode(mul_pow2(ftz(y), -e[:, None]))
        return codes, (e + 127).astype(jnp.uint8), None
    return _quantize_int4(y, spec, interpret)


def _f16_scale(numer: Array, qmax: int, interpret: bool) -> Array:
    """formats.f16_scale: float16(min(ftz(numer / qmax), 65504))."""
    s = ftz(div_rn(numer, np.float32(qmax), interpret=interpret))
    return jnp.minimum(s, F16_MAX).astype(jnp.float16)


def _quantize_int4(y: Array, spec: QuantSpec, interpret: bool) -> tuple[Array, Array, Array | None]:
    if spec.symmetric:
        qmax = 7
        scale = _f16_scale(ftz(jnp.max(jnp.abs(y), axis=1)), qmax, interpret)
        s = scale.astype(jnp.float32)[:, None]
        ok = s > 0
        q = div_rn(ftz(y), jnp.where(ok, s, 1.0), interpret=interpret)
        q = round_clip(q, -qmax, qmax, interpret=interpret)
        q = jnp.where(ok, q, 0.0).astype(jnp.int32)
        return (q & 0xF).astype(jnp.uint8), scale, None
    qmax = 15
    lo = jnp.minimum(ftz(jnp.min(y, axis=1)), 0.0)
    hi = jnp.maximum(ftz(jnp.max(y, axis=1)), 0.0)
    scale = _f16_scale(hi - lo, qmax, interpret)
    s = scale.astype(jnp.float32)
    ok = s > 0
    sd = jnp.where(ok, s, 1.0)
    zp = round_clip(div_rn(-lo, sd, interpret=interpret), 0, qmax, interpret=interpret)
    zp = jnp.where(ok, zp, 0.0)
    q = div_rn(ftz(y), sd[:, None], interpret=interpret)
    q = round_clip(q, -qmax, qmax, interpret=interpret)
    q = jnp.where(ok[:, None], jnp.clip(q + zp[:, None], 0, qmax), 0.0)
    return q.astype(jnp.uint8), scale, zp.astype(jnp.uint8)


def pack_nibbles(codes: Array) -> Array:
    """uint8 4-bit codes `(R, H)` -> bytes `(R, H/2)`, element 2j in the low nibble."""
    r, h = codes.shape
    # unstack of a trailing axis of 2 lowers to Triton's tt.split (a register shuffle)
    lo, hi = lax.unstack(codes.reshape(r, h // 2, 2), axis=2)
    return lo | (hi << 4)


def unpack_fp4_values(packed: Array) -> tuple[Array, Array]:
    """uint8 bytes `(R, C)` -> E2M1 values float32 of the low and high nibbles, each `(R, C)`."""
    return e2m1_decode(packed & np.uint8(0xF)), e2m1_decode(packed >> 4)


def fp4_kind(qt: formats.QTensor, what: str) -> str:
    """'nvfp4' | 'mxfp4' for a matmul operand; NotImplementedError otherwise."""
    if isinstance(qt.fmt, NVFP4 | MXFP4):
        return qt.fmt.name
    raise NotImplementedError(f"fp4 matmul: {what} must be nvfp4 or mxfp4, got {qt.fmt.name}")


def packed_args(qt: formats.QTensor) -> list[Array]:
    """Kernel inputs of a packed operand: codes and the block scales' bits (uint8)."""
    return [qt.codes, lax.bitcast_convert_type(qt.block_scale, jnp.uint8)]


def scale_groups(qt: formats.QTensor) -> tuple[int, int]:
    """(group size, number of groups per row) of a packed operand."""
    return qt.fmt.group, qt.block_scale.shape[-1]


def row_offsets(qt: formats.QTensor) -> tuple[Array, Array]:
    """MXFP4 FP8-path exponent offset per row (max - 6), and whether all rows span <= 14."""
    e = e8m0_to_exponent(qt.block_scale)
    hi, lo = jnp.max(e, axis=-1), jnp.min(e, axis=-1)
    return (hi - 6).astype(jnp.int32), jnp.all(hi - lo <= FP8_SPAN)
