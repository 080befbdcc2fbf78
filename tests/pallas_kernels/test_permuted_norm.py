"""permuted_norm in interpret mode: against permuted_norm_reference and pqjax.formats.

y is compared with the reference within `norm_tolerance`; every quantized output is compared
bit for bit (codes, scale bits, zero points) with `formats` applied to the kernel's own y,
and with the reference's QTensor on every row where the two y rows are identical.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.configs import NormConfig
from pallas_kernels.permuted_norm import permuted_norm, permuted_norm_reference
from pqjax import formats
from tests.pallas_kernels.helpers import (
    MODES,
    assert_qtensor_equal,
    bits,
    norm_tolerance,
    quantize,
)

B, T = 2, 5
ROWS = NormConfig(rows=2, num_warps=4)  # 3 programs per batch element, the last one partial


def _inputs(d: int, dtype, seed: int = 0, affine: bool = True, mod: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, T, d)) * 3 + 0.5
    x[0, 1] = 0.0  # an all-zero row
    x[1, 2] *= 1e4  # a large row
    x[1, 3] *= 1e-4  # a small row

    def arr(a, on: bool = True):
        return jnp.asarray(a, jnp.float32).astype(dtype) if on else None

    return dict(
        x=arr(x),
        perm=jnp.asarray(rng.permutation(d), jnp.int32),
        weight=arr(1 + 0.3 * rng.normal(size=d), affine),
        bias=arr(0.2 * rng.normal(size=d), affine),
        scale=arr(0.3 * rng.normal(size=(B, d)), mod),
        shift=arr(rng.normal(size=(B, d)), mod),
    )


def _gs(quant, kw, kind: str) -> jax.Array | None:
    """A static NVFP4 global scale as calibration would give it (the output's amax / 2688)."""
    if quant is None or quant.name != "nvfp4":
        return None
    return formats.nvfp4_global_scale(permuted_norm_reference(**kw, kind=kind))


CASES = [
    # kind, format name, options, d, dtype, affine, modulation
    ("layer", None, {}, 40, jnp.bfloat16, True, True),
    ("layer", "nvfp4", {}, 40, jnp.float32, False, True),  # FLUX's AdaLN norm, d % 16 != 0
    ("rms", "mxfp4", {}, 72, jnp.float32, True, False),  # padded to 96: 3 groups of 32
    ("layer", "int4", {"group": 16}, 48, jnp.bfloat16, True, True),
    ("rms", "int4_asym", {"group": 32}, 40, jnp.float32, False, True),
    ("none", "int4", {"group": None}, 37, jnp.float32, False, False),  # one odd-length group
]


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("kind,name,opts,d,dtype,affine,mod", CASES)
def test_matches_reference_and_formats(kind, name, opts, d, dtype, affine, mod, interpret):
    kw = _inputs(d, dtype, affine=affine, mod=mod)
    quant = None if name is None else formats.get(name, **opts)
    gs = _gs(quant, kw, kind)
    got = permuted_norm(**kw, global_scale=gs, kind=kind, quant=quant, config=ROWS, interpret=True)
    want = permuted_norm_reference(**kw, global_scale=gs, kind=kind, quant=quant)
    y, q = (got, None) if quant is None else got
    y_ref, q_ref = (want, None) if quant is None else want
    assert y.dtype == y_ref.dtype and y.shape == (B, T, d)
    diff = np.abs(np.asarray(y, np.float64) - np.asarray(y_ref, np.float64))
    assert np.all(diff <= norm_tolerance(y_ref, y.dtype)), diff.max()
    if quant is None:
        return
    assert_qtensor_equal(q, quantize(quant, y, gs))
    same = np.all(bits(y) == bits(y_ref), axis=-1)  # rows the reference computed identically
    assert same.any()
    for field in ("codes", "block_scale", "zero_point"):
        a, b = getattr(q, field), getattr(q_ref, field)
        if a is not None:
            np.testing.assert_array_equal(bits(a)[same], bits(b)[same])


@pytest.mark.parametrize("kind,name", [("layer", "nvfp4"), ("rms", "int4")])
def test_exact_statistics_give_identical_bits(kind, name):
    """Integer inputs with a sum divisible by 8 and d = 64: every float32 sum is exact in any
    order. The affine weight and the modulation factor 1 + scale are powers of two, so every
    product that XLA may contract with the following add (y * w + b, y * (1 + s) + shift) is
    exact and an FMA rounds like the separate add. So the kernel's y, and hence its QTensor,
    equal the reference's bit for bit on any CPU."""
    d = 64
    kw = _inputs(d, jnp.float32, seed=3)
    x = np.round(np.clip(np.asarray(kw["x"]), -4, 4))
    x[..., 0] -= np.sum(x, axis=-1) % 8
    kw["x"] = jnp.asarray(x)
    rng = np.random.default_rng(4)
    kw["weight"] = jnp.asarray(2.0 ** rng.integers(-2, 3, size=d), jnp.float32)
    kw["scale"] = jnp.asarray(2.0 ** rng.integers(-2, 3, size=(B, d)) - 1, jnp.float32)
    quant = formats.get(name)
    gs = _gs(quant, kw, kind)
    y, q = permuted_norm(**kw, global_scale=gs, kind=kind, quant=quant, interpret=True)
    y_ref, q_ref = permuted_norm_reference(**kw, global_scale=gs, kind=kind, quant=quant)
    np.testing.assert_array_equal(bits(y), bits(y_ref))
    assert_qtensor_equal(q, q_ref)


def _extreme_rows(d: int) -> np.ndarray:
    """Rows of huge, tiny, subnormal and E2M1-midpoint values (kind 'none': quantized as is)."""
    rng = np.random.default_rng(0)
    mid = np.array([6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, -0.25, -0.75, -2.5, -5, 0, -0.0, 4, 3])
    rows = [
        np.resize(mid, d),  # midpoints of the E2M1 grid for a group scale of 1
        np.resize(mid * 2.0**-20, d),  # the same at another binade
        rng.normal(size=d) * 3e37,  # near float32 max
        rng.normal(size=d) * 1e-36,  # near the smallest normal
        np.resize([1e-39, -1e-40, 2.0**-126, -(2.0**-125)], d),  # subnormals flush to +-0
        np.resize([65504.0 * 7, -1.0, 0.5, 1e6], d),  # int4 scale clamps at float16 max
    ]
    return np.stack(rows).astype(np.float32)


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize(
    "name,opts,gs",
    [
        ("nvfp4", {}, 1.0),
        ("nvfp4", {}, None),
        ("mxfp4", {}, None),
        ("int4_asym", {"group": 16}, None),
    ],
)
def test_extreme_values_quantize_like_formats(name, opts, gs, interpret):
    d = 48
    x = jnp.asarray(_extreme_rows(d))[None]  # (1, 6, d)
    quant = formats.get(name, **opts)
    if name == "nvfp4" and gs is None:
        gs = formats.nvfp4_global_scale(x)  # the data's own: 3e37 / 2688
    gs = None if gs is None else jnp.float32(gs)
    perm = jnp.asarray(np.random.default_rng(1).permutation(d), jnp.int32)
    y, q = permuted_norm(x, perm, global_scale=gs, kind="none", quant=quant, interpret=interpret)
    np.testing.assert_array_equal(bits(y), bits(x[..., perm]))
    assert_qtensor_equal(q, quantize(quant, x[..., perm], gs))


def test_quant_only_output_and_errors():
    kw = _inputs(32, jnp.float32, affine=False)
    quant = formats.get("mxfp4")
    y, q = permuted_norm(**kw, kind="rms", quant=quant, dense=False, interpret=True)
    _, q_dense = permuted_norm(**kw, kind="rms", quant=quant, interpret=True)
    assert y is None and q.codes.shape == (B, T, 16) and q.block_scale.dtype == jnp.float8_e8m0fnu
    assert_qtensor_equal(q, q_dense)
    with pytest.raises(ValueError, match="global_scale"):
        permuted_norm(**kw, quant=formats.get("nvfp4"), interpret=True)
    with pytest.raises(NotImplementedError, match="int3"):
        permuted_norm(**kw, quant=formats.get("int3"), interpret=True)
    with pytest.raises(ValueError, match="kind"):
        permuted_norm(**kw, kind="group", interpret=True)
