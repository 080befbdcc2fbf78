"""Shared checks of the kernel tests: bitwise QTensor equality and the tolerance bounds."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pqjax import formats
from pqjax.backends import dispatch

U = 2.0**-24  # float32 unit roundoff
ON_GPU = dispatch.mode(interpret=False) == "kernel"
# interpret mode everywhere; the compiled Triton kernels too where a CUDA GPU is present
MODES = [
    pytest.param(True, id="interpret"),
    pytest.param(False, id="triton", marks=pytest.mark.skipif(not ON_GPU, reason="no CUDA GPU")),
]


def bits(a) -> np.ndarray:
    """The raw bits of an array (fp8, float16, float32 and integer dtypes alike)."""
    a = np.asarray(a)
    return a.view(f"uint{8 * a.dtype.itemsize}")


def assert_qtensor_equal(got: formats.QTensor, want: formats.QTensor) -> None:
    """Codes, block-scale bits, global scale and zero points identical; same shape and format."""
    assert got.shape == want.shape and got.fmt == want.fmt
    np.testing.assert_array_equal(bits(got.codes), bits(want.codes))
    assert got.block_scale.dtype == want.block_scale.dtype
    np.testing.assert_array_equal(bits(got.block_scale), bits(want.block_scale))
    for a, b in ((got.global_scale, want.global_scale), (got.zero_point, want.zero_point)):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_array_equal(bits(a), bits(b))


def norm_tolerance(y_ref, out_dtype) -> np.ndarray:
    """|y - y_ref| bound for the fused norm against its reference, elementwise.

    The two differ only in the order of two float32 sums over d terms (mean, variance /
    mean square): each has a relative error of at most d*u, which moves the mean and the
    rsqrt factor by d*u of the row's scale; the rest of the arithmetic is the same. So
    |dy| <= 4 d u (|y| + max_row |y|), plus one rounding of a 16-bit output (2**-8 |y| for
    bfloat16, 2**-11 for float16) where the two values straddle a rounding boundary.
    """
    y = np.abs(np.asarray(y_ref, np.float64))
    d = y.shape[-1]
    row = y.max(axis=-1, keepdims=True)
    eps16 = {"bfloat16": 2.0**-8, "float16": 2.0**-11}.get(jnp.dtype(out_dtype).name, 0.0)
    return 4 * d * U * (y + row) + eps16 * y


def matmul_tolerance(a_deq, w_deq, k: int, extra=None) -> np.ndarray:
    """|y - y_ref| bound of an FP4 matmul against its float32 reference, elementwise.

    Kernel and reference sum the same exact products (E2M1 x scale values are exact in
    bf16 / fp8, their products exact in float32) in different orders: each float32 sum of K
    terms errs by at most (K - 1) u sum|a_k w_k|, so the two differ by at most 2 K u
    (|A| @ |W|^T). NVFP4 adds the reference's per-element rounding of (e2m1 * bs) * gs and
    the kernel's two final global-scale products: 8 u more. Values the reference flushes
    to zero (below 2**-126) add at most K 2**-126 max|W| per output. `extra`: bound terms of
    the epilogue (low-rank, bias), added as they are.
    """
    a = np.abs(np.asarray(a_deq, np.float64))
    w = np.abs(np.asarray(w_deq, np.float64))
    bound = (2 * k + 8) * U * (a @ w.T) + k * 2.0**-126 * w.max(initial=0.0)
    return bound if extra is None else bound + extra


@functools.cache
def _quantizer(fmt: formats.Format, with_gs: bool):
    if with_gs:
        return jax.jit(lambda y, gs: fmt.quantize(y, global_scale=gs))
    return jax.jit(fmt.quantize)


def quantize(fmt: formats.Format, y, global_scale=None) -> formats.QTensor:
    """fmt.quantize(y[, global_scale]) compiled once per format (eager formats are slow)."""
    if global_scale is None:
        return _quantizer(fmt, False)(y)
    return _quantizer(fmt, True)(y, global_scale)


@jax.jit
def dequantize(q: formats.QTensor) -> jax.Array:
    """q.dequantize() in float32, compiled (once per format and shape)."""
    return q.dequantize()


def record_calls(monkeypatch, module, name: str, what) -> list:
    """Wrap `module.name` so each call appends `what(*args, **kw)` to the returned list."""
    seen, fn = [], getattr(module, name)

    def recorded(*args, **kw):
        seen.append(what(*args, **kw))
        return fn(*args, **kw)

    monkeypatch.setattr(module, name, recorded)
    return seen
