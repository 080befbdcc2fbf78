"""Z-Image's sampling loop in one jit: flow-matching Euler, the pipeline's conventions.

    sched = FlowMatchEuler(shift=3.0, use_dynamic_shifting=False)   # Z-Image-Turbo's scheduler
    latents = zimage_sample(model, noise, zimage_schedule(sched, 8), caps, cap_lens)

As diffusers' ZImagePipeline: sigmas from `linspace(1, 1/n, n)` through the scheduler's shift;
the transformer receives `(1000 - t) / 1000` with t = 1000 sigma; its output is negated (it
predicts x0 - noise); Euler steps in float32. Classifier-free guidance runs where the guidance
is above 0 (the Turbo model card's setting is 0): the batch `[prompts; negatives]`, the
prediction `pos + g (pos - neg)`, with the pipeline's two options: `cfg_truncation` (no guidance
at steps whose `(1000 - t) / 1000` exceeds it) and `cfg_normalization` (the guided prediction's
norm, per image, at most that multiple of the positive one's; 0 = off).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pqjax.pipelines.components import for_sampling
from pqjax.pipelines.flow import FlowMatchEuler

DEFAULT_STEPS = 8


def zimage_schedule(sched: FlowMatchEuler, num_steps: int = DEFAULT_STEPS,
                    image_seq_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas `(n + 1,)`, transformer timesteps `(n,)`) float32, as ZImagePipeline sets them."""
    base = np.linspace(1.0, 1.0 / num_steps, num_steps, dtype=np.float32)
    sigmas = sched.sigmas(num_steps, image_seq_len=image_seq_len, sigmas=base)
    t = (sigmas[:-1] * np.float32(sched.num_train_timesteps)).astype(np.float32)
    return sigmas, ((np.float32(1000) - t) / np.float32(1000)).astype(np.float32)


def guidance_per_step(timesteps: np.ndarray, guidance: float,
                      cfg_truncation: float | None = 1.0) -> np.ndarray:
    """`(n,)` float32: the guidance of each step, 0 where `cfg_truncation` (<= 1) turns it off
    (`timesteps` are the transformer's, `(1000 - t) / 1000`)."""
    scales = np.full(np.shape(timesteps), guidance, np.float32)
    if cfg_truncation is not None and float(cfg_truncation) <= 1:
        scales[np.asarray(timesteps) > float(cfg_truncation)] = 0.0
    return scales


def guided(pos: jax.Array, neg: jax.Array, scale: jax.Array, cfg_normalization: float
           ) -> jax.Array:
    """`pos + scale (pos - neg)` float32, per image `(b, ...)`; with `cfg_normalization` > 0
    its norm is capped at that multiple of `pos`'s. A scale of 0 gives `pos` itself."""
    pos, neg = pos.astype(jnp.float32), neg.astype(jnp.float32)
    pred = pos + scale * (pos - neg)
    if cfg_normalization > 0:
        axes = tuple(range(1, pos.ndim))
        pos_norm = jnp.sqrt(jnp.sum(pos * pos, axis=axes, keepdims=True))
        new_norm = jnp.sqrt(jnp.sum(pred * pred, axis=axes, keepdims=True))
        cap = pos_norm * cfg_normalization
        pred = jnp.where(new_norm > cap, pred * (cap / new_norm), pred)
    return jnp.where(scale > 0, pred, pos)


def _step(model: Any, sigmas, timesteps, caps, cap_lens, scales, cfg_normalization: float):
    """step(i, x): Euler step i of the model's negated prediction, guided where scales say."""
    def step(i, x):
        b = x.shape[0]
        xin = x if scales is None else jnp.concatenate([x, x])
        t = jnp.full((xin.shape[0],), timesteps[i], jnp.float32)
        out = model.forward_batch(xin[:, :, None].astype(caps.dtype), t, caps, cap_lens)[:, :, 0]
        if scales is None:
            pred = out.astype(jnp.float32)
        else:
            pred = guided(out[:b], out[b:], scales[i], cfg_normalization)
        return x + (sigmas[i + 1] - sigmas[i]) * -pred

    return step


@functools.partial(jax.jit, static_argnames=("graphdef", "trajectory", "cfg_normalization"))
def _sample(graphdef, state, latents, sigmas, timesteps, caps, cap_lens, scales=None,
            trajectory=False, cfg_normalization=0.0):
    """`scales` None: one batch. Otherwise `caps`/`cap_lens` hold `[prompts; negatives]`
    (2b rows) and `scales (n,)` is the guidance of each step."""
    step = _step(nnx.merge(graphdef, state), sigmas, timesteps, caps, cap_lens, scales,
                 cfg_normalization)
    x = latents.astype(jnp.float32)
    if trajectory:  # also the sample before every step (the transformer's inputs)
        return jax.lax.scan(lambda x, i: (step(i, x), x), x, jnp.arange(timesteps.shape[0]))
    return jax.lax.fori_loop(0, timesteps.shape[0], step, x)


def _sample_eager(model, latents, sigmas, timesteps, caps, cap_lens, scales=None,
                  trajectory=False, cfg_normalization=0.0):
    """`_sample` step by step in Python, for a model that runs eagerly (one block in memory
    at a time, `pqjax.engine.streamed`)."""
    step = _step(model, sigmas, timesteps, caps, cap_lens, scales, cfg_normalization)
    x, xs = latents.astype(jnp.float32), []
    for i in range(timesteps.shape[0]):
        xs.append(x)
        x = step(i, x)
    return (x, jnp.stack(xs)) if trajectory else x


def zimage_sample(model: nnx.Module, latents: jax.Array, schedule: tuple[np.ndarray, np.ndarray],
                  caps: jax.Array, cap_lens: jax.Array, *, trajectory: bool = False,
                  negative: tuple[jax.Array, jax.Array] | None = None, guidance: float = 0.0,
                  cfg_truncation: float | None = 1.0, cfg_normalization: float = 0.0) -> Any:
    """Denoise `latents (b, c, h, w)` with caption features `caps (b, L, cap_dim)` (lengths
    `cap_lens (b,)`); returns the final latents `(b, c, h, w)` float32 (with `trajectory`: and
    the latents before every step, `(n, b, c, h, w)`).

    guidance > 0: classifier-free guidance against `negative` = (features `(b, L', cap_dim)`,
    lengths `(b,)`), with the pipeline's truncation and normalization (module docstring)."""
    model = for_sampling(model)  # one kept on disk loads now, after the prompts' encoding
    sigmas, timesteps = schedule
    scales = None
    if guidance > 0:
        if negative is None:
            raise ValueError("guidance > 0 needs the negative prompts' features")
        caps, cap_lens = join_captions((caps, cap_lens), negative)
        scales = jnp.asarray(guidance_per_step(timesteps, guidance, cfg_truncation))
    args = (latents, jnp.asarray(sigmas), jnp.asarray(timesteps), caps, jnp.asarray(cap_lens),
            scales)
    kw = dict(trajectory=trajectory, cfg_normalization=float(cfg_normalization))
    if getattr(model, "eager", False):
        return _sample_eager(model, *args, **kw)
    return _sample(*nnx.split(model), *args, **kw)


def join_captions(*parts: tuple[jax.Array, Any]) -> tuple[jax.Array, jax.Array]:
    """Caption features `(b_k, L_k, d)` with lengths, stacked into one batch (right-padded with
    zeros to the longest L): `(sum b_k, max L_k, d)` and `(sum b_k,)`."""
    width = max(f.shape[1] for f, _ in parts)
    feats = [jnp.pad(f, ((0, 0), (0, width - f.shape[1]), (0, 0))) for f, _ in parts]
    return jnp.concatenate(feats), jnp.concatenate([jnp.asarray(n) for _, n in parts])
