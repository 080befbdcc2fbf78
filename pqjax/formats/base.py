"""The Format base class and the float32 helpers every format shares.

Arithmetic model (identical in the numpy reference under tests/formats): all arithmetic is IEEE
float32 with round-to-nearest-even, except that float32 subnormals are flushed to zero of the
same sign (FTZ). XLA:CPU runs with FTZ/DAZ while numpy does not (and a GPU kernel may or may
not), so every place where a subnormal could change a result is flushed explicitly with
:func:`ftz` (a bit operation) and no subnormal constant is ever used; the bits then agree
whatever the hardware mode. Subnormal inputs are therefore quantized as (signed) zero.

Divisions are correctly rounded IEEE divisions (:func:`exact_div`), as the formats define them.
"""

from __future__ import annotations

import dataclasses
import functools
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

if TYPE_CHECKING:
    from pqjax.formats.qtensor import QTensor

Array = jax.Array
F32_MAX = float(np.finfo(np.float32).max)

_SIGN = np.uint32(0x80000000)
_EXP = np.uint32(0x7F800000)


def f32_bits(x: Array) -> Array:
    """float32 (...) -> uint32 (...) bit pattern."""
    return lax.bitcast_convert_type(x, jnp.uint32)


def bits_f32(b: Array) -> Array:
    """uint32 (...) bit pattern -> float32 (...)."""
    return lax.bitcast_convert_type(b, jnp.float32)


def ftz(x: Array) -> Array:
    """Flush float32 subnormals to zero of the same sign (float32 (...) -> float32 (...)).

    Done on the bits, so it is exact whatever the hardware's FTZ/DAZ mode is.
    """
    b = f32_bits(x)
    return jnp.where((b & _EXP) == 0, bits_f32(b & _SIGN), x)


def exact_div(a: Array, b: Array) -> Array:
    """IEEE float32 a / b, correctly rounded, for broadcastable a and b.

    XLA's algebraic simplifier rewrites a division by a constant or by a broadcast value into a
    multiplication by its reciprocal, which is off by one ulp for a good share of inputs. The
    optimization barrier on the (broadcast) divisor keeps the real division. Kernels should use
    their own correctly rounded division (e.g. div_rn) in its place.
    """
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    shape = jnp.broadcast_shapes(a.shape, b.shape)
    return jnp.broadcast_to(a, shape) / lax.optimization_barrier(jnp.broadcast_to(b, shape))


def signed_zero(x: Array) -> Array:
    """A zero carrying the sign bit of each element of float32 x."""
    return bits_f32(f32_bits(x) & _SIGN)


def pow2(e: Array) -> Array:
    """2**e as float32 for int e in [-126, 127] (built from the bits; e outside is clamped)."""
    e = jnp.clip(jnp.asarray(e, jnp.int32), -126, 127)
    return bits_f32(((e + 127).astype(jnp.uint32)) << 23)


def mul_pow2(x: Array, e: Array) -> Array:
    """ftz(x * 2**e) for float32 x and int e in [-252, 254], correctly rounded.

    Split into two factors that are normal float32 numbers, because a subnormal factor (2**-127)
    would read as zero on DAZ hardware.
    """
    e = jnp.asarray(e, jnp.int32)
    e1 = jnp.clip(e, -126, 127)
    # the first product is exact whenever it is normal; only the second can round
    return ftz((x * pow2(e1)) * pow2(e - e1))


def floor_log2(a: Array) -> Array:
    """floor(log2(a)) as int32, exactly, from the float32 bits (normal and subnormal a > 0).

    a == 0 gives -150 (below every finite value's -149). Sign is ignored. Shapes: (...) -> (...).
    """
    b = f32_bits(jnp.asarray(a, jnp.float32)) & np.uint32(0x7FFFFFFF)
    exp_field = (b >> 23).astype(jnp.int32)
    mant = b & np.uint32(0x7FFFFF)
    # subnormal: value = mant * 2**-149, floor(log2) = (31 - clz(mant)) - 149
    sub = -118 - lax.clz(mant).astype(jnp.int32)
    out = jnp.where(exp_field > 0, exp_field - 127, sub)
    return jnp.where(b == 0, -150, out)


def absmax(x: Array, axis: int | None = None, keepdims: bool = False) -> Array:
    """max |x| over axis with FTZ semantics: equal to max |ftz(x)|, without a flushed copy of x.

    (ftz is monotone in |x|, so flushing the maximum is the same as maximizing the flushed.)
    """
    return ftz(jnp.max(jnp.abs(x), axis=axis, keepdims=keepdims))


def to_groups(x: Array, group: int | None) -> Array:
    """(..., n) -> (..., G, g) with zero padding of the last axis to a multiple of g.

    group None means one group spanning the whole last axis (g = n).
    """
    n = x.shape[-1]
    g = n if group is None else group
    n_pad = -(-n // g) * g
    if n_pad != n:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n_pad - n)])
    return x.reshape(*x.shape[:-1], n_pad // g, g)


class Encoded(NamedTuple):
    """Unpacked quantizer output. codes (..., n_pad) are the format's integer codes (or fp8)."""

    codes: Array
    block_scale: Array
    global_scale: Array | None = None
    zero_point: Array | None = None


def as_float32(x: Any, name: str) -> Array:
    """Accept a float array of rank >= 1 (float16/bfloat16/float32/float64) as float32."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name}: expected a floating-point array, got dtype {x.dtype}")
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError(f"{name}: expected rank >= 1 with a non-empty last axis, got {x.shape}")
    return x.astype(jnp.float32)


def is_concrete(x: Any) -> bool:
    """True for eager (non-traced) values, where data-dependent checks can raise."""
    return not isinstance(x, jax.core.Tracer)


@jax.jit
def _count_nonfinite(x: Array) -> Array:
    return jnp.count_nonzero(~jnp.isfinite(x))


def check_finite_eager(x: Any, name: str) -> None:
    """Raise ValueError naming the format if concrete x holds NaN/Inf; no-op under tracing."""
    if not is_concrete(x):
        return
    bad = int(_count_nonfinite(x))
    if bad:
        raise ValueError(
            f"{name}: input has {bad} non-finite value(s) (NaN/Inf); quantization needs finite "
            "input. Under jax.jit use pqjax.formats.checked_quantize to detect this."
        )


class Format(ABC):
    """A per-group quantizer. Subclasses are frozen dataclasses (hashable: static jit args).

    Subclasses implement :meth:`encode` (float32 (..., n) -> unpacked codes and scales),
    :meth:`decode` (the inverse, float32 (..., n_pad)), and the code packing.
    """

    @property
    @abstractmethod
    def name(self) -> str:
        """The registry name (e.g. 'nvfp4', 'int4', 'int4_asym', 'fp8')."""

    @property
    def group_size(self) -> int | None:
        """Elements per scale along the last axis; None means the whole last axis."""
        return getattr(self, "group", None)

    def padded_len(self, n: int) -> int:
        """Length of the last axis after padding to whole groups."""
        g = self.group_size
        return n if g is None else -(-n // g) * g

    @abstractmethod
    def encode(self, x: Array, **kwargs: Any) -> Encoded:
        """float32 (..., n) -> Encoded with unpacked codes (..., n_pad); FTZ applied inside."""

    @abstractmethod
    def decode(self, enc: Encoded) -> Array:
        """Encoded -> float32 (..., n_pad) dequantized values."""

    @abstractmethod
    def pack(self, codes: Array) -> Array:
        """Unpacked codes (..., n_pad) -> storage array."""

    @abstractmethod
    def unpack(self, packed: Array, n_pad: int) -> Array:
        """Storage array -> unpacked codes (..., n_pad)."""

    def check_kwargs(self, kwargs: dict[str, Any]) -> None:
        """Eager validation of quantize keyword arguments (overridden where there are some)."""
        if kwargs:
            raise TypeError(f"{self.name}: unexpected quantize arguments {sorted(kwargs)}")

    def _checked_input(self, x: Any, kwargs: dict[str, Any]) -> Array:
        """x as float32 after the eager checks (finite values, known keyword arguments)."""
        xf = as_float32(x, self.name)
        check_finite_eager(xf, self.name)
        self.check_kwargs(kwargs)
        return xf

    def quantize(self, x: Any, **kwargs: Any) -> QTensor:
        """float (..., n) -> QTensor with packed codes. Raises ValueError on NaN/Inf (eager)."""
        from pqjax.formats.qtensor import QTensor

        xf = self._checked_input(x, kwargs)
        codes, enc = _quantize_arrays(self, xf, kwargs)
        return QTensor(
            codes=codes,
            block_scale=enc.block_scale,
            global_scale=enc.global_scale,
            zero_point=enc.zero_point,
            shape=tuple(xf.shape),
            fmt=self,
        )

    def dequantize(self, qt: QTensor, dtype: Any = jnp.float32) -> Array:
        """QTensor -> array of qt.shape in dtype (computed in float32, then cast)."""
        stored = Encoded(qt.codes, qt.block_scale, qt.global_scale, qt.zero_point)
        return _dequantize_arrays(self, stored, qt.shape[-1], jnp.dtype(dtype))

    def fake_quant(self, x: Any, dtype: Any = None, **kwargs: Any) -> Array:
        """Quantize then dequantize without packing; bit-identical to quantize -> dequantize.

        (..., n) -> (..., n) in dtype (default: x's dtype).
        """
        dtype = jnp.asarray(x).dtype if dtype is None else dtype
        xf = self._checked_input(x, kwargs)
        return _fake_quant_array(self, xf, kwargs, jnp.dtype(dtype))

    def replace(self, **changes: Any) -> Format:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


# Outside a trace, each format operation runs as one compiled program per (format, shape),
# not as a few dozen single-operation programs, each compiled on its first shape (five
# end-to-end quantizations of the tiny FLUX compiled 1271 small programs, 506 after this).
# Under a trace the bodies are inlined as before.
def _jitted_when_eager(*static_argnums: int) -> Any:
    """Run the decorated body jitted (those arguments static) unless an argument is traced."""

    def wrap(body: Any) -> Any:
        jitted = jax.jit(body, static_argnums=static_argnums)

        @functools.wraps(body)
        def run(*args: Any) -> Any:
            traced = any(not is_concrete(leaf) for leaf in jax.tree.leaves(args))
            return (body if traced else jitted)(*args)

        return run

    return wrap


@_jitted_when_eager(0)
def _quantize_arrays(fmt: Format, xf: Array, kwargs: dict[str, Any]) -> tuple[Array, Encoded]:
    enc = fmt.encode(xf, **kwargs)
    # materialize the unpacked codes once: otherwise XLA fuses the whole encoder into each
    # of the strided reads of the bit packer and recomputes it several times
    return fmt.pack(lax.optimization_barrier(enc.codes)), enc._replace(codes=None)


@_jitted_when_eager(0, 2, 3)
def _dequantize_arrays(fmt: Format, stored: Encoded, n: int, dtype: Any) -> Array:
    codes = fmt.unpack(stored.codes, fmt.padded_len(n))
    return fmt.decode(stored._replace(codes=codes))[..., :n].astype(dtype)


@_jitted_when_eager(0, 3)
def _fake_quant_array(fmt: Format, xf: Array, kwargs: dict[str, Any], dtype: Any) -> Array:
    return fmt.decode(fmt.encode(xf, **kwargs))[..., : xf.shape[-1]].astype(dtype)
