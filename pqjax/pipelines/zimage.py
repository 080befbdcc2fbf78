"""Z-Image-Turbo's sampling loop in one jit: flow-matching Euler, the pipeline's conventions.

    sched = FlowMatchEuler(shift=3.0, use_dynamic_shifting=False)   # Z-Image-Turbo's scheduler
    latents = zimage_sample(model, noise, t_sigmas(sched, 8), caps, cap_lens)

As diffusers' ZImagePipeline (guidance 0, the Turbo setting): sigmas from
`linspace(1, 1/n, n)` through the scheduler's shift; the transformer receives
`(1000 - t) / 1000` with t = 1000 sigma; its output is negated (it predicts x0 - noise);
Euler steps in float32. Caption features come from the text encoder (Qwen3, not ported yet:
pass them in).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pqjax.pipelines.flow import FlowMatchEuler

DEFAULT_STEPS = 8


def zimage_schedule(sched: FlowMatchEuler, num_steps: int = DEFAULT_STEPS,
                    image_seq_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas `(n + 1,)`, transformer timesteps `(n,)`) float32, as ZImagePipeline sets them."""
    base = np.linspace(1.0, 1.0 / num_steps, num_steps, dtype=np.float32)
    sigmas = sched.sigmas(num_steps, image_seq_len=image_seq_len, sigmas=base)
    t = (sigmas[:-1] * np.float32(sched.num_train_timesteps)).astype(np.float32)
    return sigmas, ((np.float32(1000) - t) / np.float32(1000)).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("graphdef", "trajectory"))
def _sample(graphdef, state, latents, sigmas, timesteps, caps, cap_lens, trajectory=False):
    model = nnx.merge(graphdef, state)

    def step(i, x):
        t = jnp.full((x.shape[0],), timesteps[i], jnp.float32)
        out = model.forward_batch(x[:, :, None].astype(caps.dtype), t, caps, cap_lens)[:, :, 0]
        v = -out.astype(jnp.float32)
        return x + (sigmas[i + 1] - sigmas[i]) * v

    x = latents.astype(jnp.float32)
    if trajectory:  # also the sample before every step (the transformer's inputs)
        return jax.lax.scan(lambda x, i: (step(i, x), x), x, jnp.arange(timesteps.shape[0]))
    return jax.lax.fori_loop(0, timesteps.shape[0], step, x)


def zimage_sample(model: nnx.Module, latents: jax.Array, schedule: tuple[np.ndarray, np.ndarray],
                  caps: jax.Array, cap_lens: jax.Array, *, trajectory: bool = False) -> Any:
    """Denoise `latents (b, c, h, w)` with caption features `caps (b, L, cap_dim)` (lengths
    `cap_lens (b,)`); returns the final latents `(b, c, h, w)` float32 (with `trajectory`: and
    the latents before every step, `(n, b, c, h, w)`)."""
    sigmas, timesteps = schedule
    graphdef, state = nnx.split(model)
    return _sample(graphdef, state, latents, jnp.asarray(sigmas), jnp.asarray(timesteps), caps,
                   jnp.asarray(cap_lens), trajectory=trajectory)
