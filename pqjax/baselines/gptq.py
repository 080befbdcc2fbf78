"""GPTQ: weight rounding with Hessian-based error compensation, as bit-valid QTensors.

    qmodel, report = pqjax.quantize(model, calib, QuantConfig(method="gptq"))
    qmodel, report = pqjax.quantize(model, calib, QuantConfig(method="permuquant_gptq"))

Per Linear, with X `(n, d_in)` its calibration rows and W^T `(d_out, d_in)`:
    H = 2 X^T X / n + lambda I,  lambda = damp * mean(diag H)  (`config.option("damp", 0.01)`)
    U = chol(H^-1) upper (H^-1 = U^T U)
and columns i = 0..d_in-1 in order, in groups along d_in. When a group starts, its scales are
fixed from the current (already compensated) weights of the group, as GPTQ does; then per column
    q_i = Q(w_i; group scales),  e_i = (w_i - q_i) / U_ii,  w_j -= e_i U_ij  for j > i
(within the group at once, then for all later columns with one product per group: GPTQ's lazy
batch). Channels that calibration never excites (H_ii = 0) are zeroed, as in GPTQ. Activations
stay RTN per token group. The codes and scales go straight into a QTensor of the configured
format (NVFP4: E4M3 block scales with the global scale of the original weight, as RTN has it;
MXFP4; INT sym/asym with float16 scales), whose `dequantize()` is exactly the rounded weight.

With the option ("permute", True), or as the method "permuquant_gptq", PermuQuant's site search
runs first; its accepted orders are absorbed and GPTQ runs on the absorbed model.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from pqjax import formats, permute
from pqjax.calibrate import Calibration
from pqjax.methods import (
    Option,
    Plan,
    kernel_of,
    model_sites,
    register_method,
    rtn_errors,
    search_sites,
)

if TYPE_CHECKING:
    from pqjax.quantize import QuantConfig

_HIGHEST = lax.Precision.HIGHEST
ROW_CHUNK = 1024  # output channels per GPTQ call
Params = tuple[jax.Array, ...]


# ---------------------------------------------------------------------------------------------
# Rounding with fixed group scales, per format


def group_params(fmt: formats.Format, blk: jax.Array, gs: jax.Array | None) -> Params:
    """A group's scale parameters from its values blk `(d_out, g)`: tuple of `(d_out,)`."""
    amax = formats.absmax(blk, axis=-1)
    if isinstance(fmt, formats.NVFP4):
        return (formats.nvfp4_block_scale(amax, gs),)
    if isinstance(fmt, formats.MXFP4):
        return (formats.e8m0_exponent(amax),)
    if isinstance(fmt, formats.IntFormat):
        if fmt.symmetric:
            return (formats.f16_scale(amax, fmt.qmax),)
        lo = jnp.minimum(formats.ftz(jnp.min(blk, axis=-1)), 0.0)
        hi = jnp.maximum(formats.ftz(jnp.max(blk, axis=-1)), 0.0)
        return formats.int_asym_params(lo, hi, fmt.qmax)
    raise NotImplementedError(f"gptq: no fixed-scale rounding for format {fmt.name!r}")


def round_column(
    fmt: formats.Format, col: jax.Array, params: Params, gs: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """(codes, dequantized values) of col `(d_out,)` under a group's fixed parameters."""
    if isinstance(fmt, formats.NVFP4):
        codes = formats.nvfp4_encode_values(col, params[0], gs)
        return codes, formats.nvfp4_decode_values(codes, params[0], gs)
    if isinstance(fmt, formats.MXFP4):
        codes = formats.mxfp4_encode_values(col, params[0])
        return codes, formats.mxfp4_decode_values(codes, params[0])
    if fmt.symmetric:
        codes = formats.int_sym_encode_values(col, params[0], fmt.qmax)
        return codes, formats.int_sym_decode_values(codes, params[0])
    scale, zp = params
    codes = formats.int_asym_encode_values(col, scale, zp, fmt.qmax)
    return codes, formats.int_asym_decode_values(codes, scale, zp)


def to_qtensor(
    fmt: formats.Format, codes: jax.Array, params: Params, gs: jax.Array | None, d_in: int
) -> formats.QTensor:
    """QTensor `(d_out, d_in)` from unpacked codes `(d_out, n_pad)` and params `(d_out, G)`."""
    zero_point = None
    if isinstance(fmt, formats.NVFP4):
        block_scale = params[0].astype(jnp.float8_e4m3fn)
    elif isinstance(fmt, formats.MXFP4):
        block_scale, gs = formats.e8m0_from_exponent(params[0]), None
    else:
        block_scale, gs = params[0], None
        zero_point = None if fmt.symmetric else params[1]
    return formats.QTensor(
        codes=fmt.pack(codes),
        block_scale=block_scale,
        global_scale=gs,
        zero_point=zero_point,
        shape=(codes.shape[0], d_in),
        fmt=fmt,
    )


# ---------------------------------------------------------------------------------------------
# The algorithm


@functools.partial(jax.jit, static_argnames=("n_pad",))
def inverse_factor(x: jax.Array, damp: float, n_pad: int) -> tuple[jax.Array, jax.Array]:
    """(U `(n_pad, n_pad)` upper with U^T U = H^-1, dead `(n_pad,)` channels H_ii = 0)."""
    x = x.astype(jnp.float32)
    h = 2.0 * jnp.dot(x.T, x, precision=_HIGHEST) / x.shape[0]
    pad = n_pad - h.shape[0]
    h = jnp.pad(h, ((0, pad), (0, pad)))
    diag = jnp.diag(h)
    dead = diag == 0
    eye = jnp.eye(n_pad, dtype=jnp.float32)
    h = h + jnp.diag(jnp.where(dead, 1.0, 0.0))  # dead and padded channels: unit curvature
    h = h + damp * jnp.mean(jnp.where(dead, 1.0, diag)) * eye
    hinv = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(h, lower=True), eye)
    return jnp.linalg.cholesky(hinv).T, dead


@functools.partial(jax.jit, static_argnames=("fmt",))
def gptq_rounding(
    wt: jax.Array, u: jax.Array, gs: jax.Array | None, *, fmt: formats.Format
) -> tuple[jax.Array, jax.Array, Params]:
    """GPTQ over W^T `(d_out, n_pad)`: (codes, values `(d_out, n_pad)`, params `(d_out, G)`)."""
    d_out, n = wt.shape
    g = fmt.group_size or n
    later_cols = jnp.arange(n)

    def group(w, k):
        b = k * g
        blk = lax.dynamic_slice(w, (0, b), (d_out, g))
        rows = lax.dynamic_slice(u, (b, 0), (g, n))  # U[b:b+g, :]
        ud = lax.dynamic_slice(rows, (0, b), (g, g))
        params = group_params(fmt, blk, gs)  # fixed when the group starts

        def column(blk, i):
            col = lax.dynamic_index_in_dim(blk, i, axis=1, keepdims=False)
            codes, q = round_column(fmt, col, params, gs)
            err = (col - q) / ud[i, i]
            row = jnp.where(jnp.arange(g) > i, ud[i], 0.0)
            return blk - err[:, None] * row[None, :], (codes, q, err)

        _, (codes, q, err) = lax.scan(column, blk, jnp.arange(g))  # (g, d_out) each
        rest = jnp.where(later_cols[None, :] >= b + g, rows, 0.0)
        w = w - jnp.dot(err.T, rest, precision=_HIGHEST)
        return w, (codes, q, params)

    _, (codes, q, params) = lax.scan(group, wt.astype(jnp.float32), jnp.arange(n // g))
    codes = codes.transpose(2, 0, 1).reshape(d_out, n)
    q = q.transpose(2, 0, 1).reshape(d_out, n)
    return codes, q, tuple(p.T for p in params)


def gptq_layer(
    x: jax.Array,
    w: jax.Array,
    fmt: formats.Format,
    *,
    damp: float = 0.01,
    row_chunk: int = ROW_CHUNK,
) -> tuple[formats.QTensor, jax.Array]:
    """GPTQ for one Linear: x `(n, d_in)` rows, w `(d_in, d_out)` kernel.

    Returns (QTensor `(d_out, d_in)`, its dequantized values `(d_out, d_in)` float32).
    Output channels are independent given H, so they run in zero-padded chunks of `row_chunk`
    (one compilation per d_in, whatever d_out is).
    """
    d_in, d_out = w.shape
    n_pad = fmt.padded_len(d_in)
    for _ in range(4):  # more damping when float32 Cholesky breaks down, as GPTQ's users do
        u, dead = inverse_factor(jnp.asarray(x, jnp.float32), damp, n_pad)
        if bool(jnp.all(jnp.isfinite(u))):
            break
        damp *= 10.0
    else:
        raise FloatingPointError("gptq: the Hessian stays singular after raising the damping")
    wt = jnp.asarray(w, jnp.float32).T
    gs = formats.nvfp4_global_scale(wt) if isinstance(fmt, formats.NVFP4) else None  # as RTN
    rows = -(-d_out // row_chunk) * row_chunk
    wt = jnp.where(dead[None, :], 0.0, jnp.pad(wt, ((0, rows - d_out), (0, n_pad - d_in))))
    parts = [
        gptq_rounding(wt[i : i + row_chunk], u, gs, fmt=fmt) for i in range(0, rows, row_chunk)
    ]
    codes, q = (jnp.concatenate([p[j] for p in parts])[:d_out] for j in (0, 1))
    params = tuple(
        jnp.concatenate([p[2][j] for p in parts])[:d_out] for j in range(len(parts[0][2]))
    )
    return to_qtensor(fmt, codes, params, gs, d_in), q[:, :d_in]


@functools.partial(jax.jit, static_argnames=("afmt",))
def output_error(x: jax.Array, w: jax.Array, wq: jax.Array, *, afmt) -> jax.Array:
    """||x w - Q(x) wq^T||^2 / ||x w||^2 for w `(d_in, d_out)`, wq `(d_out, d_in)`."""
    y = jnp.dot(x, w, precision=_HIGHEST)
    xq = x if afmt is None else afmt.fake_quant(x, dtype=jnp.float32)
    yq = jnp.dot(xq, wq.T, precision=_HIGHEST)
    return jnp.sum(jnp.square(y - yq)) / jnp.maximum(jnp.sum(jnp.square(y)), 1e-30)


def gptq_plan(
    model: nnx.Module,
    calib: Calibration,
    config: QuantConfig,
    targets: list[str],
    sites: list[permute.Site] | None = None,
    *,
    with_permutation: bool,
) -> Plan:
    wfmt, afmt = config.weight_format(), config.act_format()
    damp = float(config.option("damp"))
    row_chunk = int(config.option("row_chunk"))
    rtn = rtn_errors(model, calib, config, targets)
    site_rows: dict[str, dict[str, Any]] = {}
    perm_layers: dict[str, dict[str, Any]] = {}
    perms: dict[str, np.ndarray] = {}
    order: dict[str, np.ndarray] = {}  # consumer -> the order its input rows are read in
    if with_permutation:
        sites = model_sites(model, sites)
        found, site_rows, perm_layers = search_sites(model, calib, config, targets, sites)
        perms = {k: v for k, v in found.items() if site_rows[k]["accepted"]}
        for site in sites:
            for c in site.consumers if site.name in perms else ():
                order[c] = perms[site.name]
        model = permute.absorb(model, perms, site_list=sites)
    else:
        model = nnx.clone(model)
    qweights, layers = {}, {}
    for path in targets:
        if path not in calib:
            continue
        x = jnp.asarray(calib[path].rows, jnp.float32)
        if path in order:
            x = x[:, jnp.asarray(order[path])]
        w = kernel_of(model, path)
        qt, wq = gptq_layer(x, w, wfmt, damp=damp, row_chunk=row_chunk)
        qweights[path] = qt
        row = {"err_rtn": rtn[path], "err": float(output_error(x, w, wq, afmt=afmt)), "damp": damp}
        if with_permutation:
            p = perm_layers.get(path, {})
            row.update(
                site=p.get("site"),
                accepted=bool(p.get("accepted", False)),
                err_permuquant=p.get("err", rtn[path]),  # RTN in the accepted order
            )
        layers[path] = row
    return Plan(model=model, qweights=qweights, layers=layers, sites=site_rows, perms=perms)


def weights_quantized(config: QuantConfig) -> None:
    """The check of the methods that round weights: the config must quantize them."""
    if config.weights is None:
        raise ValueError(f"QuantConfig.method {config.method!r} rounds weights: "
                         "QuantConfig.weights must be a format")


GPTQ_OPTIONS = {
    "damp": Option((float, int), 0.01, "Hessian damping, a fraction of mean(diag H)",
                   positive=True),
    "row_chunk": Option(int, ROW_CHUNK, "output channels per GPTQ call", positive=True),
}


@register_method("gptq", check=weights_quantized, options={
    **GPTQ_OPTIONS,
    "permute": Option(bool, False, "also search PermuQuant's channel orders first"),
})
def gptq(model: nnx.Module, calib: Calibration, config: QuantConfig, targets: list[str],
         sites: list[permute.Site] | None = None) -> Plan:
    """GPTQ weights (Hessian-compensated rounding), RTN activations; option permute=True."""
    return gptq_plan(
        model, calib, config, targets, sites, with_permutation=bool(config.option("permute"))
    )


@register_method("permuquant_gptq", check=weights_quantized, options=GPTQ_OPTIONS)
def permuquant_gptq(
    model: nnx.Module, calib: Calibration, config: QuantConfig, targets: list[str],
    sites: list[permute.Site] | None = None,
) -> Plan:
    """PermuQuant's accepted channel orders, then GPTQ on the absorbed model."""
    return gptq_plan(model, calib, config, targets, sites, with_permutation=True)
