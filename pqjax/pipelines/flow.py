"""Flow-matching Euler sampling as diffusers' FlowMatchEulerDiscreteScheduler does it, jitted.

    sched = FlowMatchEuler.from_config(json.load(open("scheduler/scheduler_config.json")))
    sigmas = sched.sigmas(num_steps=28, image_seq_len=4096)      # (steps + 1,) ending at 0
    x = euler_sample(velocity, x0, sigmas)                      # one jit, lax.fori_loop

`velocity(x, t)` is the model call with everything else bound; t is the timestep the
transformer receives (`sigma * 1000 / 1000` rounded as diffusers rounds it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Scheduler options that change the trajectory and that this sampler does not implement.
_UNSUPPORTED = (
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "stochastic_sampling",
    "invert_sigmas",
    "shift_terminal",
)


@dataclasses.dataclass(frozen=True)
class FlowMatchEuler:
    """The deterministic flow-matching Euler scheduler (FLUX, Z-Image, SD3 family).

    Defaults are FLUX.1-dev's scheduler_config.json; schnell uses shift 1, no dynamic shifting.
    """

    num_train_timesteps: int = 1000
    shift: float = 3.0
    use_dynamic_shifting: bool = True
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15
    time_shift_type: str = "exponential"

    @classmethod
    def from_config(
        cls, raw: dict[str, Any], source: str = "scheduler_config.json"
    ) -> FlowMatchEuler:
        """From a diffusers scheduler_config.json dict; unsupported options are errors."""
        for key in _UNSUPPORTED:
            if raw.get(key):
                raise ValueError(f"{source}: scheduler option {key}={raw[key]!r} is not supported")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in names and v is not None}
        if kwargs.get("time_shift_type", "exponential") not in ("exponential", "linear"):
            raise ValueError(f"{source}: unknown time_shift_type {kwargs['time_shift_type']!r}")
        return cls(**kwargs)

    def to_config(self) -> dict[str, Any]:
        return {"_class_name": "FlowMatchEulerDiscreteScheduler", **dataclasses.asdict(self)}

    def mu(self, image_seq_len: int) -> float:
        """FLUX's resolution-dependent shift: linear in the number of image tokens."""
        m = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
        return image_seq_len * m + (self.base_shift - m * self.base_image_seq_len)

    def sigmas(
        self, num_steps: int, image_seq_len: int | None = None, sigmas: np.ndarray | None = None
    ) -> np.ndarray:
        """`(num_steps + 1,)` float32 noise levels from 1 down to 0, as FluxPipeline sets them.

        Default schedule: linspace(1, 1/num_steps, num_steps), then the shift.
        """
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        base = np.linspace(1.0, 1.0 / num_steps, num_steps) if sigmas is None else sigmas
        s = np.asarray(base).astype(np.float32)
        if self.use_dynamic_shifting:
            if image_seq_len is None:
                raise ValueError("this scheduler shifts by resolution: pass image_seq_len")
            mu = self.mu(image_seq_len)
            if self.time_shift_type == "exponential":
                s = (math.exp(mu) / (math.exp(mu) + (1 / s - 1))).astype(np.float32)
            else:
                s = (mu / (mu + (1 / s - 1))).astype(np.float32)
        else:
            s = (self.shift * s / (1 + (self.shift - 1) * s)).astype(np.float32)
        return np.concatenate([s, np.zeros(1, np.float32)])

    def model_timesteps(self, sigmas: np.ndarray) -> np.ndarray:
        """What the transformer receives at each step: (sigma * 1000) / 1000 in float32."""
        t = (sigmas[:-1] * np.float32(self.num_train_timesteps)).astype(np.float32)
        return (t / np.float32(1000)).astype(np.float32)


class StepProgress:
    """Where in-jit sampling steps report to (a tqdm bar while a sampling call is running).

    The jitted loop calls `tick` through `jax.debug.callback`; the callback target never
    changes, so the loop is not retraced when a new bar is attached.
    """

    bar: Any = None

    @classmethod
    def tick(cls, _step: Any) -> None:
        if cls.bar is not None:
            cls.bar.update(1)


def euler_sample(
    velocity: Callable[[jax.Array, jax.Array], jax.Array],
    x: jax.Array,
    sigmas: jax.Array,
    timesteps: jax.Array,
    *,
    progress: bool = False,
) -> jax.Array:
    """Integrate dx/dsigma = v from sigmas[0] to sigmas[-1] with Euler steps in float32.

    x: `(batch, ...)` initial noise; sigmas `(n + 1,)`; timesteps `(n,)` (model inputs).
    velocity(x, t) gets x in x's dtype and t `(batch,)`. Traceable: put it inside one jit
    and the loop body is compiled once whatever the number of steps. progress: report each
    step to `StepProgress`.
    """

    def step(i, x):
        x = euler_step(velocity, x, sigmas, timesteps, i)
        if progress:
            jax.debug.callback(StepProgress.tick, i, ordered=False)
        return x

    return jax.lax.fori_loop(0, timesteps.shape[0], step, x)


def euler_step(velocity: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array,
               sigmas: jax.Array, timesteps: jax.Array, i: Any) -> jax.Array:
    """One Euler step i of `euler_sample` (float32 update, x's dtype kept)."""
    t = jnp.full((x.shape[0],), timesteps[i], dtype=x.dtype)
    v = velocity(x, t)
    dt = sigmas[i + 1] - sigmas[i]
    return (x.astype(jnp.float32) + dt * v.astype(jnp.float32)).astype(x.dtype)


def pack_latents(latents: jax.Array) -> jax.Array:
    """FLUX 2x2 packing: `(b, c, h, w)` -> `(b, h/2 * w/2, 4c)` (c outer, then 2x2 rows)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even to pack 2x2, got {h}x{w}")
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: jax.Array, h: int, w: int) -> jax.Array:
    """Inverse of `pack_latents`: `(b, h/2 * w/2, 4c)` -> `(b, c, h, w)`."""
    b, _, ch = packed.shape
    x = packed.reshape(b, h // 2, w // 2, ch // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(b, ch // 4, h, w)


def latent_image_ids(h: int, w: int) -> jax.Array:
    """`(h/2 * w/2, 3)` float32 ids (0, row, col) of the packed latent grid."""
    rows, cols = np.meshgrid(np.arange(h // 2), np.arange(w // 2), indexing="ij")
    ids = np.stack([np.zeros_like(rows), rows, cols], -1).reshape(-1, 3)
    return jnp.asarray(ids, jnp.float32)
