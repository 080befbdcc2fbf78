"""Every kernel variant lowers to Triton for CUDA (cross-lowered on CPU: no GPU needed).

This checks that each primitive the kernels use has a Pallas Triton lowering rule (Triton's
own compilation to PTX happens on the GPU), and that no kernel contains an approximate
float division (`arith.divf` lowers to div.full.f32): divisions go through div.rn.f32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.fp4_matmul import fp4_matmul, w4a16_matmul
from pallas_kernels.permuted_norm import permuted_norm
from pqjax import formats

S = jax.ShapeDtypeStruct


def _triton_ir(fn, *args) -> str:
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text
    return text


@pytest.mark.parametrize(
    "kind,fmt",
    [
        ("layer", None),
        ("layer", "nvfp4"),
        ("rms", "mxfp4"),
        ("none", "int4"),
        ("layer", "int4_asym"),
    ],
)
def test_norm_lowers(kind, fmt):
    d = 3072
    x, vec, row = S((2, 64, d), jnp.bfloat16), S((d,), jnp.bfloat16), S((2, d), jnp.bfloat16)
    quant = None if fmt is None else formats.get(fmt)
    gs = S((), jnp.float32) if fmt == "nvfp4" else None
    fn = functools.partial(permuted_norm, kind=kind, quant=quant)
    ir = _triton_ir(fn, x, S((d,), jnp.int32), vec, vec, row, row, gs)
    assert "divf" not in ir
    assert ("div.rn.f32" in ir) == (fmt in ("nvfp4", "int4", "int4_asym"))


def _qt(fmt: str, rows: int, k: int) -> formats.QTensor:
    f = formats.get(fmt)
    return jax.eval_shape(f.quantize, S((rows, k), jnp.float32))


@pytest.mark.parametrize(
    "fa,fw,m,fp8",
    [("nvfp4", "nvfp4", 8, False), ("mxfp4", "mxfp4", 256, True), ("nvfp4", "mxfp4", 4608, False)],
)
def test_fp4_matmul_lowers(fa, fw, m, fp8):
    k, n, r = 3072, 1024, 32
    fn = functools.partial(fp4_matmul, out_dtype=jnp.bfloat16, fp8=fp8)
    args = (_qt(fa, m, k), _qt(fw, n, k), S((n,), jnp.bfloat16))
    ir = _triton_ir(fn, *args, S((m, r), jnp.bfloat16), S((r, n), jnp.bfloat16))
    assert "divf" not in ir
    assert ir.count("__gpu$xla.gpu.triton") == (2 if fp8 else 1)  # fp8: both cond branches


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_w4a16_lowers(dtype):
    k, n = 3072, 3072
    _triton_ir(w4a16_matmul, S((1, k), dtype), _qt("nvfp4", n, k), S((n,), dtype))
