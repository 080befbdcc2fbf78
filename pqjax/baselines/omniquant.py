"""OmniQuant's learnable weight clipping (LWC), layer by layer on the calibration rows.

    qmodel, report = pqjax.quantize(model, calib, QuantConfig(method="omniquant_lwc",
                                                             options=(("steps", 200),)))

Per Linear, with W^T `(d_out, d_in)` in quantization groups along d_in and a_og the absmax of
group g of output channel o:
    gamma_og = sigmoid(theta_og)   (theta init `config.option("init", 4.0)`: gamma ~ 0.98)
    W_c = clip(W, -gamma a, +gamma a)              (per group)
    L(theta) = ||X W - Q(X) Q(W_c)||^2 / ||X W||^2  on the layer's calibration rows
minimised with Adam (`config.option("lr", 1e-2)`, `config.option("steps", 200)`) in one jitted
scan. Rounding passes gradients straight through, with the quantization error scaled by the
clip: Q_ste(W_c) = W_c + (gamma / sg(gamma)) * sg(Q(W_c) - W_c). Its value is Q(W_c) exactly
and its gradient in gamma is dW_c/dgamma + (Q(W_c) - W_c) / gamma, since every format's group
scale is proportional to the group absmax (gamma a): LSQ's scale gradient plus the clipping
gradient, without having to differentiate a format's bit-exact encoder.
The best iterate is kept; if it does not beat plain RTN on the calibration rows the layer keeps
W. Plan.kernels holds W_c: plain RTN of it reproduces the learned group scales.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pqjax import formats, permute
from pqjax.baselines.gptq import weights_quantized
from pqjax.calibrate import Calibration
from pqjax.methods import Option, Plan, kernel_of, register_method, rtn_errors

if TYPE_CHECKING:
    from pqjax.quantize import QuantConfig

_HIGHEST = jax.lax.Precision.HIGHEST


def _groups(wt: jax.Array, group: int) -> jax.Array:
    """(d_out, d_in) -> (d_out, G, g), zero-padded like the formats pad."""
    pad = -wt.shape[1] % group
    return jnp.pad(wt, ((0, 0), (0, pad))).reshape(wt.shape[0], -1, group)


def clip_groups(wt: jax.Array, gamma: jax.Array, group: int) -> jax.Array:
    """W^T `(d_out, d_in)` clipped per group to +-gamma `(d_out, G)` times the group absmax."""
    g = _groups(wt, group)
    c = (gamma * jnp.max(jnp.abs(g), axis=-1))[..., None]
    return jnp.clip(g, -c, c).reshape(wt.shape[0], -1)[:, : wt.shape[1]]


def _rel(y: jax.Array, yq: jax.Array, den: jax.Array) -> jax.Array:
    return jnp.sum(jnp.square(y - yq)) / den


@functools.partial(jax.jit, static_argnames=("wfmt", "afmt", "steps", "lr"))
def learn_clipping(
    x: jax.Array,
    w: jax.Array,
    theta0: jax.Array,
    *,
    wfmt: formats.Format,
    afmt: formats.Format | None,
    steps: int,
    lr: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Optimise clip logits theta `(d_out, G)` for x `(n, d_in)`, w `(d_in, d_out)`.

    Returns (best theta, its relative error, the relative error of plain RTN).
    """
    wt = w.T.astype(jnp.float32)
    d_in = wt.shape[1]
    group = wfmt.group_size or d_in
    x = x.astype(jnp.float32)
    y = jnp.dot(x, w, precision=_HIGHEST)
    den = jnp.maximum(jnp.sum(jnp.square(y)), 1e-30)
    xq = x if afmt is None else afmt.fake_quant(x, dtype=jnp.float32)

    def expand(gamma: jax.Array) -> jax.Array:  # (d_out, G) -> (d_out, d_in)
        return jnp.repeat(gamma, group, axis=1)[:, :d_in]

    def loss(theta: jax.Array) -> jax.Array:
        gamma = jax.nn.sigmoid(theta)
        wc = clip_groups(wt, gamma, group)
        fq = jax.lax.stop_gradient(wfmt.fake_quant(wc, dtype=jnp.float32))
        ratio = expand(gamma / jax.lax.stop_gradient(gamma))
        wq = wc + ratio * jax.lax.stop_gradient(fq - wc)
        return _rel(y, jnp.dot(xq, wq.T, precision=_HIGHEST), den)

    opt = optax.adam(lr)

    def step(carry, _):
        theta, state, best_theta, best = carry
        value, grad = jax.value_and_grad(loss)(theta)
        better = value < best
        best_theta = jnp.where(better, theta, best_theta)
        best = jnp.where(better, value, best)
        updates, state = opt.update(grad, state, theta)
        return (optax.apply_updates(theta, updates), state, best_theta, best), None

    init = (theta0, opt.init(theta0), theta0, jnp.asarray(jnp.inf, jnp.float32))
    (theta, _, best_theta, best), _ = jax.lax.scan(step, init, None, length=steps)
    last = loss(theta)
    best_theta = jnp.where(last < best, theta, best_theta)
    rtn = _rel(y, jnp.dot(xq, wfmt.fake_quant(wt, dtype=jnp.float32).T, precision=_HIGHEST), den)
    return best_theta, jnp.minimum(best, last), rtn


@functools.partial(jax.jit, static_argnames=("wfmt", "afmt"))
def _clipped_error(x, w, theta, *, wfmt, afmt):
    """(W_c^T `(d_out, d_in)`, relative error of RTN(W_c) against the unclipped layer)."""
    wt = w.T.astype(jnp.float32)
    wc = clip_groups(wt, jax.nn.sigmoid(theta), wfmt.group_size or wt.shape[1])
    y = jnp.dot(x, w, precision=_HIGHEST)
    xq = x if afmt is None else afmt.fake_quant(x, dtype=jnp.float32)
    yq = jnp.dot(xq, wfmt.fake_quant(wc, dtype=jnp.float32).T, precision=_HIGHEST)
    return wc, _rel(y, yq, jnp.maximum(jnp.sum(jnp.square(y)), 1e-30))


def lwc_layer(
    x: jax.Array,
    w: jax.Array,
    wfmt: formats.Format,
    afmt: formats.Format | None,
    *,
    steps: int = 200,
    lr: float = 1e-2,
    init: float = 4.0,
    err_rtn: float | None = None,
) -> tuple[jax.Array, dict[str, Any]]:
    """Learned clipping for one layer: (kernel W_c `(d_in, d_out)`, report fields).

    Falls back to W itself when clipping does not lower the calibration error below err_rtn
    (default: plain RTN's, measured here).
    """
    d_in, d_out = w.shape
    n_groups = -(-d_in // (wfmt.group_size or d_in))
    theta0 = jnp.full((d_out, n_groups), init, jnp.float32)
    x = jnp.asarray(x, jnp.float32)
    theta, _, rtn = learn_clipping(x, w, theta0, wfmt=wfmt, afmt=afmt, steps=steps, lr=lr)
    wc, err = _clipped_error(x, w, theta, wfmt=wfmt, afmt=afmt)
    gamma = np.asarray(jax.nn.sigmoid(theta))
    info = {
        "err_lwc": float(err),
        "steps": steps,
        "gamma_mean": float(gamma.mean()),
        "gamma_min": float(gamma.min()),
    }
    rtn = float(rtn) if err_rtn is None else err_rtn
    if not float(err) < rtn:
        return w, {**info, "fallback": True, "err": rtn}
    return wc.T.astype(w.dtype), {**info, "fallback": False, "err": float(err)}


@register_method("omniquant_lwc", check=weights_quantized, options={
    "steps": Option(int, 200, "Adam steps per layer", positive=True),
    "lr": Option((float, int), 1e-2, "Adam learning rate", positive=True),
    "init": Option((float, int), 4.0, "clipping logit at the start (sigmoid(4) ~ 0.98)"),
})
def omniquant_lwc(
    model: nnx.Module, calib: Calibration, config: QuantConfig, targets: list[str],
    sites: list[permute.Site] | None = None,
) -> Plan:
    """Learnable weight clipping per layer; the clipped kernels go to Plan.kernels."""
    wfmt, afmt = config.weight_format(), config.act_format()
    opts = {
        "steps": int(config.option("steps")),
        "lr": float(config.option("lr")),
        "init": float(config.option("init")),
    }
    rtn = rtn_errors(model, calib, config, targets)
    kernels, layers = {}, {}
    for path in targets:
        if path not in calib:
            continue
        w = kernel_of(model, path)
        kernel, info = lwc_layer(calib[path].rows, w, wfmt, afmt, err_rtn=rtn[path], **opts)
        if not info["fallback"]:
            kernels[path] = kernel
        layers[path] = {**info, "err_rtn": rtn[path]}
    return Plan(model=nnx.clone(model), kernels=kernels, layers=layers)
