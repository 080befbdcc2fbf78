"""fp4_matmul / w4a16_matmul in interpret mode against their references (`matmul_tolerance`).

Shapes: odd M (19, one all-zero row), K = 80 (not a multiple of block_k = 32: the last K
step is half empty; nvfp4 pads nothing, mxfp4 pads K to 96), N = 40 (not a multiple of
block_n). Both the fused epilogue (split_k = 1: bias and low-rank in the kernel) and split-K
(float32 partials summed by XLA) run.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.configs import MatmulConfig, matmul_config
from pallas_kernels.fp4_matmul import (
    fp4_matmul,
    fp4_matmul_reference,
    fp8_exact,
    w4a16_matmul,
    w4a16_matmul_reference,
)
from pqjax import formats
from tests.pallas_kernels.helpers import MODES, U, dequantize, matmul_tolerance, quantize

M, K, N, R = 19, 80, 40, 5
SMALL = MatmulConfig(block_m=16, block_n=16, block_k=32, split_k=1, num_warps=4, num_stages=1)
SPLIT = MatmulConfig(block_m=16, block_n=32, block_k=32, split_k=2, num_warps=4, num_stages=1)


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(M, K)) * 2
    x[3] = 0.0  # an all-zero row
    x[5] *= 1e20  # huge and tiny rows
    x[6] *= 1e-20
    w = rng.normal(size=(N, K)) * 0.05  # W^T, as QuantLinear stores it
    arrays = (x, w, rng.normal(size=N), rng.normal(size=(M, R)), rng.normal(size=(R, N)) * 0.1)
    return tuple(jnp.asarray(a, jnp.float32) for a in arrays)


def _check(y, y_ref, a_deq, w_deq, bias=None, h=None, up=None):
    extra = 0.0
    if h is not None:
        extra = extra + (2 * R + 8) * U * (np.abs(np.asarray(h)) @ np.abs(np.asarray(up)))
    if bias is not None:
        extra = extra + 4 * U * np.abs(np.asarray(bias))[None, :]
    tol = matmul_tolerance(a_deq, w_deq, K, extra)
    diff = np.abs(np.asarray(y, np.float64) - np.asarray(y_ref, np.float64))
    assert np.all(diff <= tol), (diff - tol).max()


def _check_zero_row(y_row, bias=None, h=None, up=None):
    """An all-zero input row gives exactly 0 from the quantized product (every code is 0), so
    the row is the epilogue alone: bias + h[3] @ up. That epilogue is a float32 sum of R + 1
    terms whose multiply-adds XLA may or may not contract into FMAs, depending on the CPU, so
    it is held to (R + 2) u of sum |terms| against float64; without an epilogue the row is
    exactly zero (no 0/0 scale leaks a NaN)."""
    if bias is None:
        np.testing.assert_array_equal(y_row, np.zeros_like(y_row))
        return
    b, hr, u = (np.asarray(a, np.float64) for a in (bias, h[3], up))
    want = b + hr @ u
    tol = (R + 2) * U * (np.abs(b) + np.abs(hr) @ np.abs(u))
    diff = np.abs(np.asarray(y_row, np.float64) - want)
    assert np.all(diff <= tol), (diff - tol).max()


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize(
    "fa,fw,fp8,cfg,epilogue",
    [
        ("nvfp4", "nvfp4", False, SMALL, True),
        ("nvfp4", "nvfp4", False, SPLIT, True),
        ("mxfp4", "mxfp4", True, SMALL, True),
        ("mxfp4", "mxfp4", False, SPLIT, False),
        ("nvfp4", "mxfp4", False, SMALL, False),  # K packed to 80 and 96: mixed groups
    ],
)
def test_fp4_matmul_matches_reference(fa, fw, fp8, cfg, epilogue, interpret):
    x, wt, bias, h, up = _data()
    a, w = quantize(formats.get(fa), x), quantize(formats.get(fw), wt)
    epi = (bias, h, up) if epilogue else (None, None, None)
    y = fp4_matmul(a, w, *epi, out_dtype=jnp.float32, config=cfg, fp8=fp8, interpret=interpret)
    y_ref = fp4_matmul_reference(a, w, *epi, out_dtype=jnp.float32)
    assert y.shape == (M, N) and y.dtype == jnp.float32
    _check_zero_row(np.asarray(y)[3], *epi)
    _check(y, y_ref, dequantize(a), dequantize(w), *epi)


def test_fp8_path_only_where_exact():
    """MXFP4 rows whose block exponents span > 14 binades cannot use E4M3: bf16 path."""
    x, wt, *_ = _data(1)
    x = x.at[6].set(x[0]).at[6, :32].multiply(2.0**-20)  # one row: 2**-20 next to O(1) blocks
    fmt = formats.get("mxfp4")
    a, w = quantize(fmt, x), quantize(fmt, wt)
    assert bool(fp8_exact(quantize(fmt, x[:6]), w)) and not bool(fp8_exact(a, w))
    y = fp4_matmul(a, w, out_dtype=jnp.float32, config=SMALL, fp8=True, interpret=True)
    _check(y, fp4_matmul_reference(a, w, out_dtype=jnp.float32), dequantize(a), dequantize(w))


def test_bf16_output_and_default_config():
    x, wt, bias, *_ = _data(2)
    fmt = formats.get("nvfp4")
    a, w = quantize(fmt, x[:8]), quantize(fmt, wt)
    cfg = matmul_config(8, N, K)
    assert (cfg.block_m, cfg.block_n, cfg.block_k) == (16, 64, 128)
    y = fp4_matmul(a, w, bias, interpret=True)  # table config, bf16 output
    y_ref = fp4_matmul_reference(a, w, bias, out_dtype=jnp.float32)
    assert y.dtype == jnp.bfloat16
    tol = matmul_tolerance(dequantize(a), dequantize(w), K) + 2.0**-8 * np.abs(y_ref)
    assert np.all(np.abs(np.asarray(y, np.float64) - np.asarray(y_ref)) <= tol + 8 * U)


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("dtype,fmt", [(jnp.float32, "nvfp4"), (jnp.bfloat16, "mxfp4")])
def test_w4a16_matches_reference(dtype, fmt, interpret):
    x, wt, bias, h, up = _data(3)
    x = x.astype(dtype)
    w = quantize(formats.get(fmt), wt)
    y = w4a16_matmul(x, w, bias, h, up, out_dtype=jnp.float32, config=SMALL, interpret=interpret)
    y_ref = w4a16_matmul_reference(x, w, bias, h, up, out_dtype=jnp.float32)
    _check(y, y_ref, x.astype(jnp.float32), dequantize(w), bias, h, up)


def test_shape_and_format_errors():
    x, wt, *_ = _data()
    a = quantize(formats.get("nvfp4"), x)
    with pytest.raises(NotImplementedError, match="int4"):
        fp4_matmul(a, quantize(formats.get("int4"), wt), interpret=True)
    with pytest.raises(ValueError, match="K=80"):
        fp4_matmul(a, quantize(formats.get("nvfp4"), wt[:, :64]), interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        MatmulConfig(block_m=24)
