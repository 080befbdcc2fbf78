"""Where the model's "pallas" backend lands: the kernels on CUDA GPUs, XLA elsewhere.

    y = permuted_norm(norm, x, scale, shift)          # LayerNorm / RMSNorm (+ AdaLN modulation)
    y, xq = permuted_norm(norm, x, scale, shift, quant=fmt, global_scale=gs)   # fused output
    y = quant_linear(qlin, x)                         # QuantLinear: quantize x, FP4 matmul
    y = quant_linear(qlin, x, xq=xq)                  # reuse the norm's quantized output
                                                      # (in a model: pqjax.backends.fusion)

Modes (`mode()`): "kernel" on a CUDA GPU; "interpret" when forced (argument interpret=True or
the environment variable PQJAX_PALLAS_INTERPRET=1: the same kernels run on CPU through the
Pallas interpreter, for tests); "xla" otherwise (CPU, ROCm: the kernels use PTX), where the
functions compute exactly what the "xla" backend computes. When a kernel cannot serve a
format, shape or dtype, a PallasFallbackWarning (once per reason) names it and XLA serves.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels.configs import MAX_NORM_TILE, norm_tile
from pallas_kernels.fp4_matmul import fp4_matmul, w4a16_matmul
from pallas_kernels.kernel_math import QuantSpec
from pallas_kernels.permuted_norm import permuted_norm as norm_kernel
from pallas_kernels.permuted_norm import permuted_norm_reference
from pqjax import formats
from pqjax.models.layers import LayerNorm

ENV_INTERPRET = "PQJAX_PALLAS_INTERPRET"
FLOAT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
FP4 = ("nvfp4", "mxfp4")
_warned: set[str] = set()


class PallasFallbackWarning(UserWarning):
    """A kernel could not serve a call; XLA computed it instead (the message says why)."""


def _cuda_capability() -> tuple[int, int] | None:
    dev = jax.devices()[0]
    cc = getattr(dev, "compute_capability", None)
    if dev.platform != "gpu" or not cc:
        return None
    major, minor = str(cc).split(".")[:2]
    return int(major), int(minor)


def mode(interpret: bool | None = None) -> str:
    """'kernel' (CUDA GPU), 'interpret' (forced) or 'xla'. See the module docstring."""
    forced = os.environ.get(ENV_INTERPRET, "").lower() in ("1", "true", "yes")
    if interpret if interpret is not None else forced:
        return "interpret"
    if _cuda_capability() is not None:
        return "kernel"
    if jax.devices()[0].platform == "gpu":
        fallback("pallas backend", "the kernels need a CUDA GPU (they use PTX); not this GPU")
    return "xla"


NO_GPU = "no CUDA GPU here, so XLA computes what the kernels would"


def warn_no_gpu() -> None:
    """Warn once, where no CUDA GPU serves the kernels, that XLA runs instead (interpret mode,
    forced by the environment variable, is not warned about)."""
    if mode() == "xla" and jax.devices()[0].platform != "gpu":
        fallback("pallas backend", f"{NO_GPU} (set {ENV_INTERPRET}=1 to run them in interpret "
                 "mode)")


def fallback(op: str, reason: str) -> None:
    """Warn once per (op, reason) that XLA serves `op` instead of a kernel."""
    key = f"{op}: {reason}"
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"pqjax.backends: {key}; falling back to XLA", PallasFallbackWarning, 2)


def _fp8_ok(m: str) -> bool:
    """FP8 tensor-core dots exist from sm_89 (Ada, Hopper, Blackwell incl. sm_120)."""
    cc = _cuda_capability()
    return m == "interpret" or (cc is not None and cc >= (8, 9))


def _norm_args(norm: Any) -> tuple[str, dict[str, Any]]:
    kind = "layer" if isinstance(norm, LayerNorm) else "rms"
    get = lambda name: None if getattr(norm, name, None) is None else getattr(norm, name)[...]  # noqa: E731
    return kind, {"perm": get("perm"), "weight": get("scale"), "bias": get("bias")}


def _norm_problem(x, scale, shift, quant, gs) -> str | None:
    if x.dtype not in FLOAT_DTYPES:
        return f"x dtype {x.dtype} (kernels take bfloat16, float16, float32)"
    group = 16 if quant is None else quant.group_size
    if norm_tile(x.shape[-1], group) > MAX_NORM_TILE:
        return (f"rows of {x.shape[-1]} channels: a {norm_tile(x.shape[-1], group)}-element "
                f"register tile, past the {MAX_NORM_TILE} the kernel holds without spilling")
    if (scale is not None or shift is not None) and x.ndim != 3:
        return f"modulation needs x as (batch, tokens, d), got {x.shape}"
    if quant is not None:
        try:
            QuantSpec.from_format(quant)
        except NotImplementedError as e:
            return str(e)
        if quant.name == "nvfp4" and gs is None:
            return "nvfp4 output without a static global scale (calibrate act amax)"
    return None


def permuted_norm(
    norm: Any,
    x: jax.Array,
    scale: jax.Array | None = None,
    shift: jax.Array | None = None,
    *,
    quant: formats.Format | None = None,
    global_scale: jax.Array | None = None,
    dense: bool = True,
    interpret: bool | None = None,
) -> jax.Array | tuple[jax.Array | None, formats.QTensor]:
    """`norm(x, scale, shift)` for a LayerNorm / RMSNorm module (its perm, affine and eps).

    x `(..., d)` (`(B, T, d)` with modulation rows scale/shift `(B, d)`). With quant, also
    returns the output quantized for the next matmul (a QTensor of shape x.shape).
    """
    kind, p = _norm_args(norm)
    kw = dict(kind=kind, eps=float(norm.eps), quant=quant, dense=dense)
    args = (p["perm"], p["weight"], p["bias"], scale, shift, global_scale)
    m = mode(interpret)
    problem = None if m == "xla" else _norm_problem(x, scale, shift, quant, global_scale)
    if problem is not None:
        fallback(f"permuted_norm ({kind})", problem)
    # Without modulation rows are independent: any leading dimensions become (1, rows, d).
    mod = scale is not None or shift is not None
    x3 = x if x.ndim == 3 or mod else x.reshape(1, -1, x.shape[-1])
    if m == "xla" or problem is not None:
        out = permuted_norm_reference(x3, *args, **kw)
    else:
        out = norm_kernel(x3, *args, **kw, interpret=m == "interpret")
    if x.ndim == 3:
        return out
    if quant is None:
        return out.reshape(x.shape)
    y, q = out
    return (None if y is None else y.reshape(x.shape)), _reshape_q(q, x.shape)


def _reshape_q(q: formats.QTensor, shape: tuple[int, ...]) -> formats.QTensor:
    """The same quantized rows under other leading dimensions."""
    lead = shape[:-1]

    def r(a):
        return None if a is None or a.ndim == 0 else a.reshape(*lead, a.shape[-1])

    return formats.QTensor(
        codes=r(q.codes),
        block_scale=r(q.block_scale),
        global_scale=q.global_scale,
        zero_point=r(q.zero_point),
        shape=tuple(shape),
        fmt=q.fmt,
    )


def _linear_problem(qlin: Any, x: jax.Array, xq: formats.QTensor | None) -> str | None:
    if qlin.weight_fmt.name not in FP4:
        return f"weights in {qlin.weight_fmt.name} (the matmul kernels take nvfp4 / mxfp4)"
    act = qlin.act_fmt
    if act is not None and act.name not in FP4:
        return f"activations in {act.name} (W4A4 kernels take nvfp4 / mxfp4)"
    if x is not None and x.dtype not in FLOAT_DTYPES:
        return f"x dtype {x.dtype}"
    online = qlin.input_transform is not None or qlin.input_scale is not None
    if xq is not None and (act is None or xq.fmt != act or online):
        raise ValueError(
            "quant_linear: xq must be in the layer's activation format, for a layer without an "
            f"online input transform or scale (xq {xq.fmt.name}, layer "
            f"{getattr(act, 'name', None)})"
        )
    return None


def quantize_activations(
    x: jax.Array, fmt: formats.Format, global_scale: jax.Array | None, *, interpret: bool
) -> formats.QTensor:
    """Rows of x `(M, K)` quantized by the kernel (a permuted norm with kind 'none')."""
    if fmt.name == "nvfp4" and global_scale is None:
        global_scale = formats.nvfp4_global_scale(x)  # dynamic per-tensor, as formats does
    _, q = norm_kernel(
        x[None],
        global_scale=global_scale,
        kind="none",
        quant=fmt,
        dense=False,
        interpret=interpret,
    )
    return _reshape_q(q, x.shape)


def quant_linear(
    qlin: Any,
    x: jax.Array | None,
    xq: formats.QTensor | None = None,
    *,
    interpret: bool | None = None,
) -> jax.Array:
    """A QuantLinear's full forward (quantized product, low-rank branch, bias) on the kernels.

    x `(..., d_in)` in the layer's dtype; xq: x already quantized in the layer's activation
    format (from a fused norm), which skips the activation quantization. x may be None with
    xq when the kernels run and the layer has no low-rank branch (a fused norm that wrote
    only the codes).
    """
    m = mode(interpret)
    if x is None and (xq is None or m == "xla" or qlin.low_rank_down is not None):
        raise ValueError(
            "quant_linear: x=None needs xq, the kernels (not the xla mode) and a layer "
            "without a low-rank branch"
        )
    problem = None if m == "xla" else _linear_problem(qlin, x, xq)
    if problem is not None:
        fallback("quant_linear", problem)
        if x is None:  # unreachable after fusion.plan, which checks the same conditions
            raise ValueError(f"quant_linear: only quantized input, and {problem}")
    if m == "xla" or problem is not None:
        return qlin.xla_forward(x)
    shape = xq.shape if x is None else x.shape
    lead, k = shape[:-1], shape[-1]
    x2 = None if x is None else x.reshape(-1, k)
    h = up = None
    if qlin.low_rank_down is not None:
        h, up = x2 @ qlin.low_rank_down[...], qlin.low_rank_up[...]
    if qlin.input_transform is not None:  # never with xq (_linear_problem)
        from pqjax.rotate import apply_input_transform

        x2 = apply_input_transform(qlin.input_transform, x2)
    bias = None if qlin.bias is None else qlin.bias[...]
    w = qlin.weight()
    itp = m == "interpret"
    if qlin.act_fmt is None:
        y = w4a16_matmul(x2, w, bias, h, up, out_dtype=qlin.dtype, interpret=itp)
    else:
        if xq is None:
            gs = None if qlin.act_global_scale is None else qlin.act_global_scale[...]
            xq = quantize_activations(x2, qlin.act_fmt, gs, interpret=itp)
        else:
            xq = _reshape_q(xq, (math.prod(lead), k))
        y = fp4_matmul(xq, w, bias, h, up, out_dtype=qlin.dtype, fp8=_fp8_ok(m), interpret=itp)
    return y.reshape(*lead, y.shape[-1])
