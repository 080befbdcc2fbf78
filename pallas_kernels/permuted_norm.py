"""Fused permuted-read norm + AdaLN modulation (+ quantized output), Pallas Triton kernel.

    y = permuted_norm(x, perm, weight, bias, scale, shift, kind="layer", eps=1e-6)
    y, q = permuted_norm(x, perm, scale=s, shift=t, quant=formats.get("nvfp4"), global_scale=gs)

x `(B, T, d)`; perm `(d,)` int32 (channel j of the output reads x[..., perm[j]]); weight, bias
`(d,)` (affine, already in permuted order); scale, shift `(B, d)` (AdaLN rows, permuted order).
kind: "layer" (LayerNorm), "rms" (RMSNorm) or "none" (no normalization: a permuted read and
quantization of x). Output y `(B, T, d)` written contiguously; q a `formats.QTensor` of y
(codes `(B, T, n_pad/2)`, block scales `(B, T, G)`), bit-exact with `quant.quantize(y)`.

The arithmetic is the model's (`pqjax.models.layers`): statistics in float32 (mean as
sum * float32(1/d), which is what XLA makes of jnp.mean), the normalized row rounded to x's
dtype, then modulation in the promoted dtypes of x, scale and shift, each step rounded as
XLA rounds it. Only the order of the float32 reductions differs from XLA (Triton sums as a
tree), so y matches `permuted_norm_reference` to within a few float32 ulps; the quantized
output is computed from the kernel's own y and equals `formats` on it bit for bit.

Tiling: grid (B, ceil(T / rows)); a program normalizes `rows` tokens of one batch element.
A row lives in registers as a tile (Gp, H): Gp groups of the output format's group size g
(16 when nothing is quantized), padded to powers of two, element (i, j) = channel i*g + j.
The permutation, the affine vectors and the batch element's modulation rows are loaded once
per program and reused for all its rows. x is read by a gather x[b, t, perm[c]] (the
permuted read: the row's 32-byte sectors stay in L1, so HBM sees each byte once); y, the
packed codes (nibble pairs split with one register shuffle) and the scales are written with
contiguous stores.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.configs import NormConfig, norm_config
from pallas_kernels.kernel_math import (
    QuantSpec,
    compiler_params,
    next_pow2,
    pack_nibbles,
    quantize_tile,
)
from pqjax import formats
from pqjax.formats.base import ftz

Array = jax.Array
KINDS = ("layer", "rms", "none")
NO_QUANT_GROUP = 16


@dataclasses.dataclass(frozen=True)
class _Static:
    kind: str
    eps: float
    d: int
    tokens: int
    g: int
    gp: int
    h: int
    flags: tuple[bool, ...]  # perm, weight, bias, scale, shift
    dtypes: tuple[str, str, str, str]  # x, 1 + scale, after scale, after shift (= output)
    quant: QuantSpec | None
    dense: bool
    rows: int
    interpret: bool


def _rnd(v: Array, dtype: str) -> Array:
    """Round float32 v to dtype and back (how XLA evaluates a 16-bit elementwise op)."""
    return v if dtype == "float32" else v.astype(dtype).astype(jnp.float32)


def _kernel(*refs, st: _Static) -> None:
    refs = list(refs)
    x_ref = refs.pop(0)
    perm_ref, w_ref, b_ref, sc_ref, sh_ref = (refs.pop(0) if f else None for f in st.flags)
    spec = st.quant
    gs_ref = refs.pop(0) if spec is not None and spec.kind == "nvfp4" else None
    y_ref = refs.pop(0) if st.dense else None
    c_ref, s_ref = (refs.pop(0), refs.pop(0)) if spec is not None else (None, None)
    z_ref = refs.pop(0) if spec is not None and not spec.symmetric else None

    d, g, gp, h = st.d, st.g, st.gp, st.h
    bi = pl.program_id(0)
    t0 = pl.program_id(1) * st.rows
    gi = lax.broadcasted_iota(jnp.int32, (gp, h), 0)
    hj = lax.broadcasted_iota(jnp.int32, (gp, h), 1)
    col = gi * g + hj
    in_row = (hj < g) & (col < d)
    # masked lanes point past the end: interpret mode drops out-of-bounds stores
    col_out = jnp.where(in_row, col, d)
    src = col if perm_ref is None else plgpu.load(perm_ref.at[col_out], mask=in_row, other=0)

    def channel(ref, batch_row: bool) -> Array | None:
        if ref is None:
            return None
        view = ref.at[bi, col_out] if batch_row else ref.at[col_out]
        return plgpu.load(view, mask=in_row, other=0).astype(jnp.float32)

    w, bias = channel(w_ref, False), channel(b_ref, False)
    mscale, mshift = channel(sc_ref, True), channel(sh_ref, True)
    x_dt, s_dt, m_dt, o_dt = st.dtypes
    if mscale is not None:
        mscale = _rnd(1.0 + mscale, s_dt)  # the model's `1 + scale`, in scale's dtype
    gs = None if gs_ref is None else gs_ref[0]
    inv_d = np.float32(1.0) / np.float32(d)

    if spec is not None:
        n_pad = spec.padded_len(d)
        n_groups = n_pad // g
        n_bytes = -(-n_pad // 2)
        in_pad = (hj < g) & (col < n_pad)
        hb = h // 2
        gb = lax.broadcasted_iota(jnp.int32, (gp, hb), 0)
        jb = lax.broadcasted_iota(jnp.int32, (gp, hb), 1)
        bcol = gb * (g // 2) + jb  # g is odd only for one whole-row group (gp == 1)
        b_ok = (jb < -(-g // 2)) & (bcol < n_bytes)
        gvec = lax.broadcasted_iota(jnp.int32, (gp,), 0)
        g_ok = gvec < n_groups

    def row(i: Array, carry: Array) -> Array:
        t = t0 + i
        t_ok = t < st.tokens
        m = in_row & t_ok
        x = plgpu.load(x_ref.at[bi, t, src], mask=m, other=0).astype(jnp.float32)
        if st.kind == "layer":
            mean = jnp.sum(x) * inv_d
            c = jnp.where(m, x - mean, 0.0)
            y = c * lax.rsqrt(jnp.sum(c * c) * inv_d + np.float32(st.eps))
        elif st.kind == "rms":
            y = x * lax.rsqrt(jnp.sum(x * x) * inv_d + np.float32(st.eps))
        else:
            y = x
        if w is not None:
            y = y * w
        if bias is not None:
            y = y + bias
        y = _rnd(y, x_dt)
        if mscale is not None:
            y = _rnd(y * mscale, m_dt)
        if mshift is not None:
            y = _rnd(y + mshift, o_dt)
        y = jnp.where(m, y, 0.0)
        if y_ref is not None:
            plgpu.store(y_ref.at[bi, t, col_out], y.astype(y_ref.dtype), mask=m)
        if spec is not None:
            codes, scale, zp = quantize_tile(y, spec, gs, interpret=st.interpret)
            packed = pack_nibbles(jnp.where(in_pad, codes, 0).astype(jnp.uint8))
            bm = b_ok & t_ok
            plgpu.store(c_ref.at[bi, t, jnp.where(bm, bcol, n_bytes)], packed, mask=bm)
            gm = g_ok & t_ok
            gidx = jnp.where(gm, gvec, n_groups)
            plgpu.store(s_ref.at[bi, t, gidx], scale.astype(s_ref.dtype), mask=gm)
            if z_ref is not None:
                plgpu.store(z_ref.at[bi, t, gidx], zp, mask=gm)
        return carry

    lax.fori_loop(0, st.rows, row, jnp.int32(0))


def _out_dtypes(x: Array, scale: Array | None, shift: Array | None) -> tuple[str, ...]:
    x_dt = jnp.dtype(x.dtype)
    s_dt = x_dt if scale is None else jnp.dtype(scale.dtype)
    m_dt = x_dt if scale is None else jnp.result_type(x_dt, s_dt)
    o_dt = m_dt if shift is None else jnp.result_type(m_dt, shift.dtype)
    return tuple(jnp.dtype(t).name for t in (x_dt, s_dt, m_dt, o_dt))


def _check(x: Array, kind: str, quant: formats.Format | None, gs: Array | None) -> None:
    if kind not in KINDS:
        raise ValueError(f"permuted_norm: kind must be one of {KINDS}, got {kind!r}")
    if x.ndim != 3:
        raise ValueError(f"permuted_norm: x must be (batch, tokens, d), got shape {x.shape}")
    if quant is not None and quant.name == "nvfp4" and gs is None:
        raise ValueError(
            "permuted_norm: nvfp4 output needs a static global_scale (calibrated act amax/2688);"
            " a per-call tensor amax would need a second pass over the output"
        )


@functools.partial(
    jax.jit, static_argnames=("kind", "eps", "quant", "dense", "config", "interpret")
)
def permuted_norm(
    x: Array,
    perm: Array | None = None,
    weight: Array | None = None,
    bias: Array | None = None,
    scale: Array | None = None,
    shift: Array | None = None,
    global_scale: Array | None = None,
    *,
    kind: str = "layer",
    eps: float = 1e-6,
    quant: formats.Format | None = None,
    dense: bool = True,
    config: NormConfig | None = None,
    interpret: bool = False,
) -> Array | tuple[Array | None, formats.QTensor]:
    """The fused kernel (see module docstring). Returns y, or (y or None, QTensor) with quant.

    dense=False (with quant) skips writing y: the next matmul reads only the codes.
    """
    _check(x, kind, quant, global_scale)
    spec = None if quant is None else QuantSpec.from_format(quant)
    nb, nt, d = x.shape
    g = NO_QUANT_GROUP if spec is None else spec.group_len(d)
    cfg = config or norm_config(d, nt, g)
    dtypes = _out_dtypes(x, scale, shift)
    optional = (perm, weight, bias, scale, shift)
    st = _Static(
        kind=kind,
        eps=float(eps),
        d=d,
        tokens=nt,
        g=g,
        gp=next_pow2(-(-d // g)),
        h=max(next_pow2(g), 2),
        flags=tuple(a is not None for a in optional),
        dtypes=dtypes,
        quant=spec,
        dense=dense or spec is None,
        rows=cfg.rows,
        interpret=interpret,
    )
    args = [x, *(a for a in optional if a is not None)]
    out_shape = []
    if spec is not None and spec.kind == "nvfp4":
        gs = ftz(jnp.asarray(global_scale, jnp.float32))
        args.append(gs.reshape(1))
    if st.dense:
        out_shape.append(jax.ShapeDtypeStruct((nb, nt, d), dtypes[3]))
    if spec is not None:
        n_pad = spec.padded_len(d)
        n_groups = n_pad // g
        out_shape.append(jax.ShapeDtypeStruct((nb, nt, -(-n_pad // 2)), jnp.uint8))
        out_shape.append(jax.ShapeDtypeStruct((nb, nt, n_groups), spec.scale_dtype))
        if not spec.symmetric:
            out_shape.append(jax.ShapeDtypeStruct((nb, nt, n_groups), jnp.uint8))
    outs = pl.pallas_call(
        functools.partial(_kernel, st=st),
        grid=(nb, pl.cdiv(nt, cfg.rows)),
        out_shape=out_shape,
        compiler_params=compiler_params(cfg.num_warps, 1),
        interpret=interpret,
        name=f"permuted_{kind}_norm",
    )(*args)
    outs = list(outs)
    y = outs.pop(0) if st.dense else None
    if spec is None:
        return y
    return y, _qtensor(outs, spec, quant, (nb, nt, d), args[-1] if spec.kind == "nvfp4" else None)


def _qtensor(
    outs: list[Array], spec: QuantSpec, fmt: formats.Format, shape: tuple, gs: Array | None
) -> formats.QTensor:
    codes, scale = outs[0], outs[1]
    if spec.kind == "nvfp4":
        scale = lax.bitcast_convert_type(scale, jnp.float8_e4m3fn)
    elif spec.kind == "mxfp4":
        scale = lax.bitcast_convert_type(scale, jnp.float8_e8m0fnu)
    return formats.QTensor(
        codes=codes,
        block_scale=scale,
        global_scale=None if gs is None else gs.reshape(()),
        zero_point=outs[2] if len(outs) > 2 else None,
        shape=shape,
        fmt=fmt,
    )


@functools.partial(jax.jit, static_argnames=("kind", "eps", "quant", "dense"))
def permuted_norm_reference(
    x: Array,
    perm: Array | None = None,
    weight: Array | None = None,
    bias: Array | None = None,
    scale: Array | None = None,
    shift: Array | None = None,
    global_scale: Array | None = None,
    *,
    kind: str = "layer",
    eps: float = 1e-6,
    quant: formats.Format | None = None,
    dense: bool = True,
) -> Array | tuple[Array | None, formats.QTensor]:
    """Pure jnp: gather, the model's LayerNorm / RMSNorm, modulation, then `formats`.

    Same op sequence as `pqjax.models.layers` (LayerNorm.normalize + modulate), so it is
    bit-identical to the model's "xla" path.
    """
    _check(x, kind, quant, global_scale)
    x32 = (x if perm is None else jnp.take(x, perm, axis=-1)).astype(jnp.float32)
    if kind == "layer":
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        centered = x32 - mean
        var = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
        y = centered * lax.rsqrt(var + eps)
    elif kind == "rms":
        y = x32 * lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    else:
        y = x32
    if weight is not None:
        y = y * weight.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    y = y.astype(x.dtype)
    if scale is not None:
        y = y * (1 + scale[:, None, :])
    if shift is not None:
        y = y + shift[:, None, :]
    if quant is None:
        return y
    kw = {"global_scale": global_scale} if quant.name == "nvfp4" else {}
    # the barrier materializes y in its dtype: XLA's default excess precision would otherwise
    # let the quantizer read the unrounded float32 values of a fused 16-bit y
    return (y if dense else None), quant.quantize(lax.optimization_barrier(y), **kw)
