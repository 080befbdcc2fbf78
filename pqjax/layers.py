"""The quantized linear: a packed weight, and input quantization per token group on the fly.

    qlin = QuantLinear.from_linear(lin, weights=formats.get("nvfp4"), acts=formats.get("nvfp4"),
                                   act_amax=calib_absmax.max())
    y = qlin(x)                     # x (..., d_in) -> (..., d_out), same call as Linear

Backends (one switch, `set_backend(model, name)`):
- "xla"        fake-quantized activations and the dequantized packed weight in XLA (default);
- "xla_packed" activations really packed to codes and unpacked again: bit-identical to "xla",
               exercises the storage path;
- "pallas"     the fused Pallas kernels (GPU), bound by `pqjax.backends` (`register_linear_route`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pqjax import formats
from pqjax.models.layers import Linear

BACKENDS = ("xla", "xla_packed", "pallas")
LinearRoute = Callable[..., jax.Array]
_LINEAR_ROUTES: dict[str, LinearRoute] = {}


def register_linear_route(backend: str, route: LinearRoute) -> None:
    """Serve QuantLinears whose `backend` is `backend` by `route(qlin, x, xq=None)`: x in the
    layer's dtype (None when a fused norm gave only codes), xq the norm's quantized output."""
    _LINEAR_ROUTES[backend] = route


def _linear_route(qlin: QuantLinear) -> LinearRoute:
    try:
        return _LINEAR_ROUTES[qlin.backend]
    except KeyError:
        raise ValueError(
            f"QuantLinear: backend {qlin.backend!r} is not bound; switch backends with "
            "pqjax.set_backend(model, ...)"
        ) from None


@functools.partial(jax.jit, static_argnames=("fmt",))
def quantize_weight(kernel: jax.Array, fmt: formats.Format) -> formats.QTensor:
    """A Flax kernel `(d_in, d_out)` as the packed QTensor `(d_out, d_in)`, jitted per shape.

    Eager quantization would dispatch (and compile) each of its ~100 ops per weight shape.
    """
    return fmt.quantize(kernel.T.astype(jnp.float32))


@jax.jit
def _all_finite(arrays: tuple[jax.Array, ...]) -> jax.Array:
    """(len(arrays),) bool: does each array hold only finite values (one device sync)."""
    return jnp.stack([jnp.isfinite(a.astype(jnp.float32)).all() for a in arrays])


@jax.jit
def _represented_max(kernel: jax.Array, qt: formats.QTensor) -> jax.Array:
    """(max |kernel|, max |dequantized weight|), float32, to see a saturated block scale."""
    dq = qt.dequantize(jnp.float32)
    return jnp.stack([jnp.max(jnp.abs(kernel.astype(jnp.float32))), jnp.max(jnp.abs(dq))])


def _concrete(*xs: Any) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


class QuantState(nnx.Variable):
    """Packed quantized storage (codes, scales): saved and restored, never trained."""


def _opt(value: Any) -> Any:
    return nnx.data(None if value is None else QuantState(value))


class QuantLinear(nnx.Module):
    """y = Q_act(x) @ dequant(W_q) + bias, W_q stored as a packed `(d_out, d_in)` QTensor.

    Optional extras set by methods, applied in this order:
    - `input_scale` `(d_in,)`: x * input_scale first (online smoothing where it cannot be folded
      into the producer; on GPU it fuses into the activation quantizer);
    - `low_rank_down (d_in, r)`, `low_rank_up (r, d_out)`: a 16-bit branch on the scaled x
      added to the output (SVDQuant);
    - `input_transform`: the name of an online transform of x before quantization (e.g. a
      block Hadamard; the weight holds its inverse).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        weight: formats.QTensor,
        bias: jax.Array | None,
        acts: formats.Format | None,
        act_global_scale: jax.Array | None = None,
        backend: str = "xla",
        dtype: Any = jnp.float32,
    ):
        if weight.shape != (out_features, in_features):
            raise ValueError(
                f"weight QTensor shape {weight.shape} != {(out_features, in_features)}"
            )
        self.in_features, self.out_features = in_features, out_features
        self.weight_fmt = weight.fmt
        self.act_fmt = acts
        self.codes = QuantState(weight.codes)
        self.block_scale = QuantState(weight.block_scale)
        self.global_scale = _opt(weight.global_scale)
        self.zero_point = _opt(weight.zero_point)
        self.act_global_scale = _opt(act_global_scale)
        self.bias = nnx.data(None if bias is None else nnx.Param(bias))
        self.input_scale = nnx.data(None)
        self.low_rank_down = nnx.data(None)
        self.low_rank_up = nnx.data(None)
        self.input_transform: str | None = None
        self.dtype = dtype
        self.backend = backend
        self.observer = nnx.data(None)

    @classmethod
    def from_linear(
        cls,
        linear: Linear,
        *,
        weights: formats.Format,
        acts: formats.Format | None,
        act_amax: jax.Array | float | None = None,
        backend: str = "xla",
        kernel: jax.Array | None = None,
    ) -> QuantLinear:
        """Quantize `linear` (or `kernel`, a transformed `(d_in, d_out)` replacement)."""
        k = linear.kernel[...] if kernel is None else kernel
        bias = None if linear.bias is None else linear.bias[...]
        if _concrete(k) and not bool(_all_finite((k,))[0]):
            raise ValueError(
                f"{weights.name}: a ({k.shape[0]}, {k.shape[1]}) kernel holds NaN "
                "or Inf; quantization needs finite weights"
            )
        if bias is not None and _concrete(bias) and not bool(_all_finite((bias,))[0]):
            raise ValueError(f"the ({bias.shape[0]},) bias holds NaN or Inf")
        qt = quantize_weight(k, weights)
        if _concrete(k):
            _check_represented(k, qt, weights)
        gs = None
        if acts is not None and acts.name == "nvfp4" and act_amax is not None:
            amax = jnp.asarray(act_amax, jnp.float32)
            gs = formats.nvfp4_global_scale(amax)
            if _concrete(gs) and not bool(jnp.isfinite(gs)):
                raise ValueError(
                    f"act_global_scale is {float(gs)} (calibrated input absmax {float(amax)}); "
                    "it needs finite activation statistics"
                )
        return cls(
            linear.in_features,
            linear.out_features,
            weight=qt,
            bias=bias,
            acts=acts,
            act_global_scale=gs,
            backend=backend,
            dtype=linear.kernel[...].dtype,
        )

    def nonfinite_state(self) -> list[str]:
        """Names of the stored arrays (scales, bias, extras) holding NaN or Inf; [] if none.

        Codes are integers; a non-finite scale, bias or 16-bit extra would make every output
        of the layer NaN or Inf, whatever its input.
        """
        names = ["block_scale", "global_scale", "act_global_scale", "bias", "input_scale",
                 "low_rank_down", "low_rank_up"]
        held = [(n, getattr(self, n)) for n in names if getattr(self, n) is not None]
        arrays = tuple(v[...] for _, v in held)
        if not arrays or not _concrete(*arrays):
            return []
        ok = np.asarray(_all_finite(arrays))
        return [n for (n, _), good in zip(held, ok, strict=True) if not good]

    def weight(self) -> formats.QTensor:
        """The packed weight as a QTensor `(d_out, d_in)`."""
        return formats.QTensor(  # get_value: an abstract layer gives its shapes too
            codes=self.codes.get_value(),
            block_scale=self.block_scale.get_value(),
            global_scale=None if self.global_scale is None else self.global_scale.get_value(),
            zero_point=None if self.zero_point is None else self.zero_point.get_value(),
            shape=(self.out_features, self.in_features),
            fmt=self.weight_fmt,
        )

    def quantize_input(self, x: jax.Array) -> jax.Array:
        """Q(x) along d_in, per token group, returned dequantized in x's dtype."""
        if self.input_transform is not None:
            from pqjax.rotate import apply_input_transform

            x = apply_input_transform(self.input_transform, x)
        if self.act_fmt is None:
            return x
        kwargs = {}
        if self.act_global_scale is not None:
            kwargs["global_scale"] = self.act_global_scale[...]
        if self.backend == "xla_packed":
            return self.act_fmt.quantize(x, **kwargs).dequantize(x.dtype)
        return self.act_fmt.fake_quant(x, dtype=x.dtype, **kwargs)

    def __call__(self, x: Any) -> jax.Array:
        """x `(..., d_in)`, or a fused norm's PendingNorm ("pallas": the norm quantized x)."""
        xq = None
        if not isinstance(x, jax.Array | np.ndarray):
            x, xq = x.resolve(self)  # pqjax.backends.fusion.PendingNorm
            if x is None:  # the fused norm wrote only the codes: the kernel reads them
                if self.observer is not None or self.input_scale is not None:
                    raise ValueError(
                        "QuantLinear: a fused norm gave only quantized input, but this layer "
                        "observes or scales its input, which it did not have when the norm "
                        'was fused; call pqjax.set_backend(model, "pallas") again after '
                        "attaching observers or input scales"
                    )
                return _linear_route(self)(self, None, xq=xq)
        if self.observer is not None:
            self.observer(x)
        x = x.astype(self.dtype)
        if self.input_scale is not None:
            x = x * self.input_scale[...]
        if self.backend not in ("xla", "xla_packed"):
            return _linear_route(self)(self, x, xq=xq)  # bias and low-rank branch: epilogue
        return self.xla_forward(x)

    def xla_forward(self, x: jax.Array | None, xq: formats.QTensor | None = None) -> jax.Array:
        """The rest of the forward in XLA ("xla" / "xla_packed"; the kernels' fallback).

        x: the input in the layer's dtype, already multiplied by input_scale. xq: x already
        quantized in the layer's activation format (a fused norm's codes, `(..., d_in)`):
        the product of those codes (x may then be None, without a low-rank branch).
        """
        xq = self.quantize_input(x) if xq is None else xq.dequantize(self.dtype)
        w = self.weight().dequantize(self.dtype)  # (d_out, d_in)
        y = jnp.einsum("...k,nk->...n", xq, w, preferred_element_type=jnp.float32)
        y = y.astype(self.dtype)
        if self.low_rank_down is not None:
            y = y + (x @ self.low_rank_down[...]) @ self.low_rank_up[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y

    @property
    def nbytes(self) -> int:
        """Bytes of the stored weight (packed codes + scales) and 16-bit extras, not the bias."""
        total = self.weight().nbytes
        for v in (self.input_scale, self.low_rank_down, self.low_rank_up):
            if v is not None:  # size x itemsize: also for an abstract (eval_shape) layer
                total += int(v.get_value().size) * jnp.dtype(v.get_value().dtype).itemsize
        return total


def _check_represented(kernel: jax.Array, qt: formats.QTensor, fmt: formats.Format) -> None:
    """Refuse a weight whose quantization overflowed: a non-finite scale, or a largest
    weight the format cannot reach because its block scale saturated (an INT block scale is
    float16: max |w| above qmax * 65504 is clipped silently).

    Rounding the scale of the largest block loses at most a quarter of its maximum (MXFP4's
    power-of-two scale s maps a block max between 4s and 8s to 6s; NVFP4 and INT lose far
    less), so a represented maximum below half the true one can only come from saturation.
    """
    scales = (qt.block_scale,) + (() if qt.global_scale is None else (qt.global_scale,))
    if not bool(np.asarray(_all_finite(scales)).all()):
        raise ValueError(f"{fmt.name}: the quantized weight's scales hold NaN or Inf")
    w_max, dq_max = (float(v) for v in np.asarray(_represented_max(kernel, qt)))
    if not np.isfinite(dq_max) or dq_max < 0.5 * w_max:
        raise ValueError(
            f"{fmt.name}: the weight's largest magnitude {w_max:.4g} overflows the format "
            f"(it quantizes to {dq_max:.4g}); rescale the layer or keep it in 16-bit"
        )
