"""Per-group number formats for PermuQuant and its baselines (groups along the LAST axis).

    fmt = formats.get("nvfp4")                   # or "mxfp4", "int4" (group=64), "int3_asym", "fp8"
    qt = fmt.quantize(x)                         # QTensor pytree; qt.dequantize(), qt.nbytes
    y = formats.fake_quant(x, "int4", group=32)  # quantize -> dequantize, no bit packing
    formats.names()                              # registered names; formats.register adds one

Every function is a pure jnp program (jit-able on CPU and GPU); formats are frozen, hashable
dataclasses usable as static jit arguments. Details per format: fp4.py (E2M1, nvfp4, mxfp4),
integer.py, fp8.py; storage layout: packing.py; arithmetic model: base.py.

Edge-case decisions (the numpy reference in tests/formats implements the same):
  * float32 arithmetic, RNE, with subnormal results and inputs flushed to signed zero (FTZ), so
    every backend gives the same bits; divisions are IEEE (never reciprocal multiplications).
  * Sign of zero is kept by the float formats: -0.0 (or a negative value rounding to zero)
    gets the E2M1 / E4M3 negative-zero code and dequantizes to -0.0. Integer codes have no -0.
  * A zero divisor (all-zero tensor or group, nvfp4 block scale rounding to 0 in E4M3, a
    float16 int scale rounding to 0, an fp8 scale flushed to 0) encodes zeros, never NaN.
  * mxfp4 all-zero blocks store exponent -127 (E8M0 bits 0x00).
  * Saturation: E2M1 at +-6, E4M3 at +-448, int codes at +-qmax / [0, qmax], float16 scales at
    65504; dequantized values are clipped to the finite float32 range.
  * Asymmetric ints include 0 in the range: lo = min(min x, 0), hi = max(max x, 0).
  * A last axis the group size does not divide is zero-padded and trimmed on output.
  * NaN/Inf input raises ValueError eagerly (naming the format and the count); under jax.jit
    use checked_quantize / checked_fake_quant (checkify), which return (error, result).
"""

from __future__ import annotations

from typing import Any

import jax

from pqjax.formats.base import (
    Encoded,
    Format,
    absmax,
    exact_div,
    floor_log2,
    ftz,
    mul_pow2,
    pow2,
)
from pqjax.formats.checks import check_finite, checked_fake_quant, checked_quantize, resolve
from pqjax.formats.fp4 import (
    MXFP4,
    NVFP4,
    e2m1_decode,
    e2m1_encode,
    e2m1_round,
    e8m0_exponent,
    e8m0_from_exponent,
    e8m0_to_exponent,
    mxfp4_decode_values,
    mxfp4_encode_values,
    nvfp4_block_scale,
    nvfp4_decode_values,
    nvfp4_encode_values,
    nvfp4_global_scale,
)
from pqjax.formats.fp8 import FP8, e4m3_encode, e4m3_round, fp8_decode_values, fp8_encode_values
from pqjax.formats.integer import (
    IntFormat,
    f16_scale,
    int_asym_decode_values,
    int_asym_encode_values,
    int_asym_params,
    int_qmax,
    int_sym_decode_values,
    int_sym_encode_values,
)
from pqjax.formats.packing import pack_bits, packed_len, sign_extend, unpack_bits
from pqjax.formats.qtensor import QTensor
from pqjax.formats.quartz import QuartzFormat  # noqa: F401  (registers quartz, quartz3)
from pqjax.formats.registry import get, names, register


def quantize(x: jax.Array, fmt: str | Format, **kwargs: Any) -> QTensor:
    """Quantize x (..., n) with a format (name + options, or a Format) -> QTensor."""
    f, qkw = resolve(fmt, kwargs)
    return f.quantize(x, **qkw)


def fake_quant(x: jax.Array, fmt: str | Format, dtype: Any = None, **kwargs: Any) -> jax.Array:
    """quantize -> dequantize without bit packing, bit-identical to it. (..., n) -> (..., n).

    dtype defaults to x's dtype. kwargs: format options when fmt is a name (group=, scaling=,
    symmetric=) and quantize arguments (global_scale= for nvfp4, scale= for fp8).
    """
    f, qkw = resolve(fmt, kwargs)
    return f.fake_quant(x, dtype=dtype, **qkw)


__all__ = [
    "FP8",
    "MXFP4",
    "NVFP4",
    "Encoded",
    "Format",
    "IntFormat",
    "QTensor",
    "absmax",
    "check_finite",
    "checked_fake_quant",
    "checked_quantize",
    "e2m1_decode",
    "e2m1_encode",
    "e2m1_round",
    "e4m3_encode",
    "e4m3_round",
    "e8m0_exponent",
    "e8m0_from_exponent",
    "e8m0_to_exponent",
    "exact_div",
    "f16_scale",
    "fake_quant",
    "floor_log2",
    "fp8_decode_values",
    "fp8_encode_values",
    "ftz",
    "get",
    "int_asym_decode_values",
    "int_asym_encode_values",
    "int_asym_params",
    "int_qmax",
    "int_sym_decode_values",
    "int_sym_encode_values",
    "mul_pow2",
    "mxfp4_decode_values",
    "mxfp4_encode_values",
    "names",
    "nvfp4_block_scale",
    "nvfp4_decode_values",
    "nvfp4_encode_values",
    "nvfp4_global_scale",
    "pack_bits",
    "packed_len",
    "pow2",
    "quantize",
    "register",
    "sign_extend",
    "unpack_bits",
]
