"""FP4 matmuls with packed operands, Pallas Triton: W4A4 (`fp4_matmul`) and W4A16 (`w4a16_matmul`).

    y = fp4_matmul(a_q, w_q, bias)            # a_q QTensor (M, K), w_q QTensor (N, K) -> (M, N)
    y = w4a16_matmul(x, w_q, bias)            # x (M, K) bf16/f32, w_q QTensor (N, K)

Both operands are `pqjax.formats` QTensors with groups along K: codes `(rows, K_pad/2)` uint8
(two E2M1 codes per byte, element 0 low), block scales `(rows, K_pad/g)` (NVFP4: E4M3 per 16
and an FP32 global scale; MXFP4: E8M0 per 32). The weight is pqjax's QuantLinear storage, the
QTensor of W^T, read as it is (no transpose of packed data in HBM): y = A @ W^T.

Tiling: grid (ceil(M/bm), ceil(N/bn), split_k). Each K step loads a (bm, bk/2) and a
(bn, bk/2) byte tile and the (rows, bk/g) scale tiles; unpacking and scaling happen in
registers: a byte's low and high nibbles give the even and odd K elements, so a step makes
two dots, even with even and odd with odd (K order does not matter to a sum), and no
interleaving is needed. A scale tile is broadcast over its group by a register reshape.
Dequantized values are exact in bf16: E2M1 (2 significant bits) times E4M3 (4 bits) has at
most 6, and E2M1 times 2**e keeps float32's exponent range; the NVFP4 global scales are
applied once, to the float32 accumulator. Output in out_dtype, with optional bias and the
SVDQuant low-rank branch as an epilogue: `h @ up`, h = x @ down `(M, r)` computed by XLA
beforehand (a skinny matmul of the 16-bit input; fusing it would need the unquantized x tile
in this kernel).

FP8 path (MXFP4 x MXFP4, `fp8=True`, sm_89+): each row r of an operand gets an exponent
offset o_r = max_g e[r, g] - 6, and its values E2M1 * 2**(e - o_r) are cast to E4M3. That is
exact when e - o_r lies in [-8, 6] (E2M1 magnitudes are 2**-1..1.5 * 2**2; E4M3 represents
m * 2**p exactly down to its subnormal 2**-9 and up to 448), i.e. when every row's block
exponents span at most 14 binades. The wrapper checks that on the scales (all-zero blocks,
E8M0 2**-127, count too) and takes the bf16 path otherwise (lax.cond); the accumulator is
multiplied by 2**(o_r + o_c) at the end. NVFP4 values (6 significant bits) are not exact in
E4M3, so NVFP4 always takes the bf16 path.

Accuracy: every product is exact, so kernel and reference differ only by the order of the
float32 accumulation (and, for NVFP4, where the global scales are applied): see the tests'
bound |y - y_ref| <= (2K + 8) 2**-24 (|A| @ |W|^T).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.configs import MatmulConfig, matmul_config
from pallas_kernels.kernel_math import (
    compiler_params,
    e4m3_from_bits,
    fp4_kind,
    mul_pow2,
    next_pow2,
    packed_args,
    pow2_exact,
    row_offsets,
    scale_groups,
    unpack_fp4_values,
)
from pqjax import formats
from pqjax.formats.base import ftz

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class _Static:
    m: int
    n: int
    k: int
    kb: int  # bytes per packed row (the longer of A's and W's when groups differ)
    a_kind: str  # "nvfp4" | "mxfp4" | "dense"
    w_kind: str
    a_groups: tuple[int, int]  # (group, number of groups) of A; (0, 0) when dense
    w_groups: tuple[int, int]
    dot_dtype: str  # "bfloat16" | "float32" | "float8_e4m3fn"
    has_gs: bool
    has_bias: bool
    rank: int  # low-rank r (0: none), padded to rank_p in the kernel
    cfg: MatmulConfig
    steps: int  # K steps per split
    interpret: bool


def _dot_nt(a: Array, b: Array) -> Array:
    """a (m, k) @ b (n, k)^T in float32 (IEEE for float32 operands)."""
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(
        a, b, (((1,), (1,)), ((), ())), precision=prec, preferred_element_type=jnp.float32
    )


def _dot_nn(a: Array, b: Array) -> Array:
    """a (m, r) @ b (r, n) in float32."""
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot(a, b, precision=prec, preferred_element_type=jnp.float32)


def _expand(s: Array, group: int) -> Array:
    """Per-group values (R, n) -> per byte column (R, n * group/2) by a register broadcast."""
    r, n = s.shape
    return jnp.broadcast_to(s[:, :, None], (r, n, group // 2)).reshape(r, n * (group // 2))


def _packed_side(codes_ref, scale_ref, off, idx, idx_ok, kb0, kind, groups, st):
    """Dequantized even / odd K elements (R, bk/2) of a packed operand at byte offset kb0."""
    hb = st.cfg.block_k // 2
    bcol = kb0 + lax.broadcasted_iota(jnp.int32, (hb,), 0)
    mask = idx_ok[:, None] & (bcol < codes_ref.shape[1])[None, :]
    packed = plgpu.load(codes_ref.at[idx[:, None], bcol[None, :]], mask=mask, other=0)
    lo, hi = unpack_fp4_values(packed)
    group, n_groups = groups
    ng = st.cfg.block_k // group
    gcol = (kb0 * 2) // group + lax.broadcasted_iota(jnp.int32, (ng,), 0)
    smask = idx_ok[:, None] & (gcol < n_groups)[None, :]
    raw = plgpu.load(scale_ref.at[idx[:, None], gcol[None, :]], mask=smask, other=0)
    if kind == "nvfp4":
        s = _expand(e4m3_from_bits(raw), group)
        return (lo * s).astype(st.dot_dtype), (hi * s).astype(st.dot_dtype)
    e = _expand(raw.astype(jnp.int32) - 127, group)
    if st.dot_dtype == "float8_e4m3fn":
        p = pow2_exact(e - off[:, None])  # in [2**-8, 2**6] where the wrapper chose this path
        return (lo * p).astype(st.dot_dtype), (hi * p).astype(st.dot_dtype)
    return mul_pow2(lo, e).astype(st.dot_dtype), mul_pow2(hi, e).astype(st.dot_dtype)


def _dense_side(x_ref, rows, r_ok, kb0, st):
    """Even / odd K columns (bm, bk/2) of a dense activation at byte offset kb0."""
    hb = st.cfg.block_k // 2
    ke = 2 * (kb0 + lax.broadcasted_iota(jnp.int32, (hb,), 0))
    out = []
    for kk in (ke, ke + 1):
        mask = r_ok[:, None] & (kk < st.k)[None, :]
        v = plgpu.load(x_ref.at[rows[:, None], kk[None, :]], mask=mask, other=0)
        out.append(v.astype(st.dot_dtype))
    return out


def _kernel(*refs, st: _Static) -> None:
    refs = list(refs)
    if st.a_kind == "dense":
        x_ref, a_codes, a_scale = refs.pop(0), None, None
    else:
        x_ref, a_codes, a_scale = None, refs.pop(0), refs.pop(0)
    w_codes, w_scale = refs.pop(0), refs.pop(0)
    gs_ref = refs.pop(0) if st.has_gs else None
    fp8 = st.dot_dtype == "float8_e4m3fn"
    a_off_ref, w_off_ref = (refs.pop(0), refs.pop(0)) if fp8 else (None, None)
    bias_ref = refs.pop(0) if st.has_bias else None
    h_ref, up_ref = (refs.pop(0), refs.pop(0)) if st.rank else (None, None)
    (o_ref,) = refs
    c = st.cfg
    rows = pl.program_id(0) * c.block_m + lax.broadcasted_iota(jnp.int32, (c.block_m,), 0)
    cols = pl.program_id(1) * c.block_n + lax.broadcasted_iota(jnp.int32, (c.block_n,), 0)
    r_ok, c_ok = rows < st.m, cols < st.n
    a_off = plgpu.load(a_off_ref.at[rows], mask=r_ok, other=0) if fp8 else None
    w_off = plgpu.load(w_off_ref.at[cols], mask=c_ok, other=0) if fp8 else None
    first = pl.program_id(2) * st.steps

    def step(i: Array, acc: Array) -> Array:
        kb0 = (first + i) * (c.block_k // 2)
        if x_ref is not None:
            a_lo, a_hi = _dense_side(x_ref, rows, r_ok, kb0, st)
        else:
            a_lo, a_hi = _packed_side(
                a_codes, a_scale, a_off, rows, r_ok, kb0, st.a_kind, st.a_groups, st
            )
        w_lo, w_hi = _packed_side(
            w_codes, w_scale, w_off, cols, c_ok, kb0, st.w_kind, st.w_groups, st
        )
        return acc + _dot_nt(a_lo, w_lo) + _dot_nt(a_hi, w_hi)

    acc = lax.fori_loop(0, st.steps, step, jnp.zeros((c.block_m, c.block_n), jnp.float32))
    if gs_ref is not None:
        acc = (acc * gs_ref[0]) * gs_ref[1]
    if fp8:
        acc = mul_pow2(acc, a_off[:, None] + w_off[None, :])
    acc = ftz(acc)
    mask = r_ok[:, None] & c_ok[None, :]
    if c.split_k > 1:  # float32 partial sums; the wrapper adds them and runs the epilogue
        out = o_ref.at[pl.program_id(2), rows[:, None], cols[None, :]]
    else:
        out = o_ref.at[rows[:, None], cols[None, :]]
        if h_ref is not None:
            acc = acc + _lowrank_tile(h_ref, up_ref, rows, cols, r_ok, c_ok, st.rank)
        if bias_ref is not None:
            b = plgpu.load(bias_ref.at[cols], mask=c_ok, other=0).astype(jnp.float32)
            acc = acc + b[None, :]
    plgpu.store(out, acc.astype(o_ref.dtype), mask=mask)


def _lowrank_tile(h_ref, up_ref, rows, cols, r_ok, c_ok, rank: int) -> Array:
    """h[rows] @ up[:, cols] (bm, bn) float32; the rank is zero padded to >= 16 (tl.dot)."""
    rr = lax.broadcasted_iota(jnp.int32, (max(16, next_pow2(rank)),), 0)
    r_in = rr < rank
    h_mask = r_ok[:, None] & r_in[None, :]
    h = plgpu.load(h_ref.at[rows[:, None], rr[None, :]], mask=h_mask, other=0)
    up_mask = r_in[:, None] & c_ok[None, :]
    up = plgpu.load(up_ref.at[rr[:, None], cols[None, :]], mask=up_mask, other=0)
    if h.dtype != up.dtype or h.dtype not in (jnp.bfloat16, jnp.float16):
        h, up = h.astype(jnp.float32), up.astype(jnp.float32)
    return _dot_nn(h, up)


def fp8_exact(a: formats.QTensor, w: formats.QTensor) -> Array:
    """Whether the FP8 path is exact for MXFP4 a and w (bool scalar; False for NVFP4)."""
    if a.fmt.name != "mxfp4" or w.fmt.name != "mxfp4":
        return jnp.bool_(False)
    return row_offsets(a)[1] & row_offsets(w)[1]


def _check_weight(w: formats.QTensor, k: int) -> None:
    if len(w.shape) != 2 or w.shape[1] != k:
        raise ValueError(f"fp4 matmul: weight QTensor must be (N, K={k}), got {w.shape}")


def _matmul(a_args, a_kind, a_groups, mk, w, epi, *, out_dtype, dot_dtype, gs, offs, cfg, itp):
    """Launch the kernel: A given by a_args, (M, K) = mk, epi = (bias, h, up). -> (M, N)."""
    (m, k), n, (bias, h, up) = mk, w.shape[0], epi
    if dot_dtype == "float8_e4m3fn":  # an FP8 MMA takes K >= 32 per instruction
        cfg = dataclasses.replace(cfg, block_k=max(cfg.block_k, 64))
    kb = w.codes.shape[-1] if a_kind == "dense" else max(w.codes.shape[-1], a_args[0].shape[-1])
    total = -(-2 * kb // cfg.block_k)
    steps = -(-total // cfg.split_k)
    cfg = dataclasses.replace(cfg, split_k=-(-total // steps))  # no empty splits
    fused = cfg.split_k == 1
    rank = 0 if (h is None or not fused) else h.shape[1]
    w_kind = fp4_kind(w, "w")
    st = _Static(m, n, k, kb, a_kind, w_kind, a_groups, scale_groups(w), dot_dtype,
                 gs is not None, fused and bias is not None, rank, cfg, steps, itp)  # fmt: skip
    args = [*a_args, *packed_args(w)]
    args += [] if gs is None else [gs]
    args += [] if offs is None else list(offs)
    args += [bias] if st.has_bias else []
    args += [h, up] if rank else []
    out = pl.pallas_call(
        functools.partial(_kernel, st=st),
        grid=(pl.cdiv(m, cfg.block_m), pl.cdiv(n, cfg.block_n), cfg.split_k),
        out_shape=jax.ShapeDtypeStruct(
            (m, n) if fused else (cfg.split_k, m, n), out_dtype if fused else jnp.float32
        ),
        compiler_params=compiler_params(cfg.num_warps, cfg.num_stages),
        interpret=itp,
        name=f"{a_kind}_x_{w_kind}_matmul",
    )(*args)
    return out if fused else _epilogue(jnp.sum(out, axis=0), bias, h, up, out_dtype)


def _epilogue(y: Array, bias, h, up, out_dtype) -> Array:
    """float32 y + h @ up + bias, cast (the split-K epilogue and the references)."""
    if h is not None:
        hp = lax.Precision.HIGHEST
        y = y + jnp.dot(h.astype(jnp.float32), up.astype(jnp.float32), precision=hp)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(out_dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "config", "fp8", "interpret"))
def fp4_matmul(
    a: formats.QTensor,
    w: formats.QTensor,
    bias: Array | None = None,
    lowrank_h: Array | None = None,
    lowrank_up: Array | None = None,
    *,
    out_dtype: jnp.dtype = jnp.bfloat16,
    config: MatmulConfig | None = None,
    fp8: bool = False,
    interpret: bool = False,
) -> Array:
    """W4A4: A (M, K) @ W^T, a and w FP4 QTensors (w stored as (N, K)); bias (N,);
    lowrank_h (M, r), lowrank_up (r, N). -> (M, N) out_dtype. fp8: the MXFP4 FP8 path."""
    a_kind, w_kind = fp4_kind(a, "a"), fp4_kind(w, "w")
    if len(a.shape) != 2:
        raise ValueError(f"fp4_matmul: a must be a 2-D QTensor (M, K), got {a.shape}")
    m, k = a.shape
    _check_weight(w, k)
    gs = None
    if "nvfp4" in (a_kind, w_kind):
        one = jnp.float32(1.0)
        pair = [q.global_scale if q.fmt.name == "nvfp4" else one for q in (a, w)]
        gs = jnp.stack(pair).astype(jnp.float32)
    cfg = config or matmul_config(m, w.shape[0], k)
    epi = (bias, lowrank_h, lowrank_up)
    run = functools.partial(
        _matmul, packed_args(a), a_kind, scale_groups(a), (m, k), w, epi,
        out_dtype=out_dtype, gs=gs, cfg=cfg, itp=interpret,
    )  # fmt: skip
    if fp8 and a_kind == w_kind == "mxfp4":
        (a_off, a_ok), (w_off, w_ok) = row_offsets(a), row_offsets(w)
        return lax.cond(
            a_ok & w_ok,
            lambda: run(dot_dtype="float8_e4m3fn", offs=(a_off, w_off)),
            lambda: run(dot_dtype="bfloat16", offs=None),
        )
    return run(dot_dtype="bfloat16", offs=None)


@functools.partial(jax.jit, static_argnames=("out_dtype", "config", "interpret"))
def w4a16_matmul(
    x: Array,
    w: formats.QTensor,
    bias: Array | None = None,
    lowrank_h: Array | None = None,
    lowrank_up: Array | None = None,
    *,
    out_dtype: jnp.dtype | None = None,
    config: MatmulConfig | None = None,
    interpret: bool = False,
) -> Array:
    """W4A16: x (M, K) 16/32-bit @ W^T, w an FP4 QTensor (N, K). -> (M, N) (x's dtype).

    bf16 x multiplies in bf16 (the weight values are exact in it); other dtypes in float32.
    """
    if x.ndim != 2:
        raise ValueError(f"w4a16_matmul: x must be (M, K), got {x.shape}")
    m, k = x.shape
    _check_weight(w, k)
    gs = None
    if fp4_kind(w, "w") == "nvfp4":
        gs = jnp.stack([jnp.float32(1.0), w.global_scale]).astype(jnp.float32)
    return _matmul(
        [x], "dense", (0, 0), (m, k), w, (bias, lowrank_h, lowrank_up),
        out_dtype=out_dtype or x.dtype,
        dot_dtype="bfloat16" if x.dtype == jnp.bfloat16 else "float32",
        gs=gs, offs=None, cfg=config or matmul_config(m, w.shape[0], k), itp=interpret,
    )  # fmt: skip


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def fp4_matmul_reference(
    a: formats.QTensor,
    w: formats.QTensor,
    bias: Array | None = None,
    lowrank_h: Array | None = None,
    lowrank_up: Array | None = None,
    *,
    out_dtype: jnp.dtype = jnp.bfloat16,
) -> Array:
    """Pure jnp: formats' float32 dequantization of both operands, float32 matmul, epilogue."""
    y = jnp.dot(a.dequantize(), w.dequantize().T, precision=lax.Precision.HIGHEST)
    return _epilogue(y, bias, lowrank_h, lowrank_up, out_dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def w4a16_matmul_reference(
    x: Array,
    w: formats.QTensor,
    bias: Array | None = None,
    lowrank_h: Array | None = None,
    lowrank_up: Array | None = None,
    *,
    out_dtype: jnp.dtype | None = None,
) -> Array:
    """Pure jnp: x in float32 @ formats' float32 dequantized weight, epilogue."""
    y = jnp.dot(x.astype(jnp.float32), w.dequantize().T, precision=lax.Precision.HIGHEST)
    return _epilogue(y, bias, lowrank_h, lowrank_up, out_dtype or x.dtype)
