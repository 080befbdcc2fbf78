"""SANA-1.5's sampling loop in one jit: flow DPM-Solver++ (2nd order) with classifier-free guidance.

    import json
    from pqjax.pipelines.sana import SanaSchedule, sana_sample

    model = convert.load_transformer("Efficient-Large-Model/SANA1.5_1.6B_1024px_diffusers",
                                     dtype=jnp.bfloat16)
    config = json.load(open(".../scheduler/scheduler_config.json"))
    schedule = SanaSchedule.from_config(config, num_steps=20)
    noise = jax.random.normal(jax.random.key(0), (1, 32, 32, 32))    # 1024 px -> 32x32 latents
    latents = sana_sample(model, noise, schedule,
                          gemma, mask,                  # (b, 300, 2304) Gemma-2 states, (b, 300)
                          neg_gemma, neg_mask,          # the encoded empty prompt "", its mask
                          guidance_scale=4.5)           # (b, 32, 32, 32) float32, for DC-AE

The model card's defaults (diffusers `SanaPipeline` with SANA1.5_1.6B_1024px_diffusers):
20 steps, guidance 4.5, and the scheduler_config.json's `DPMSolverMultistepScheduler` with
`use_flow_sigmas=True`, `flow_shift=3.0` (6.0 for the 4K models), `prediction_type=
"flow_prediction"`, `algorithm_type="dpmsolver++"`, `solver_order=2`, `final_sigmas_type="zero"`.
Conventions, as diffusers (schedulers/scheduling_dpmsolver_multistep.py, pipelines/sana):
- sigmas: `s = 1 - linspace(1, 1/1000, n + 1)`, shifted `k s / (1 + (k - 1) s)`, reversed, the
  last (0) dropped, then a final 0 appended; computed in float64, stored float32.
- timesteps: `int64(sigma * 1000)` (truncated, from the float64 sigmas); the transformer receives
  `float32(t) * config.timestep_scale`, in [0, 1000).
- latents start as `randn * init_noise_sigma` (1.0) and are carried in float32.
- the model's output v (the flow velocity, noise - x0; its first half if `out_channels` is twice
  the latent channels) gives `x0 = x - sigma v`; DPM-Solver++ works on x0 with `alpha = 1 - sigma`,
  `lambda = log(alpha) - log(sigma)`. First order at the first step and at the last one (always,
  since `final_sigmas_type="zero"`), 2nd-order multistep (midpoint) in between.
- guidance: the batch is doubled `[uncond; cond]`, `v = v_u + g (v_c - v_u)`, when g > 1.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pqjax.pipelines.components import for_sampling

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 4.5
DEFAULT_FLOW_SHIFT = 3.0

# Scheduler options that must be off: they change the sigmas or the update.
_MUST_BE_FALSE = (
    "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
    "thresholding",
)


@dataclasses.dataclass(frozen=True)
class SanaSchedule:
    """Host-side schedule of `DPMSolverMultistepScheduler(**config).set_timesteps(n)`.

    sigmas: `(n + 1,)` float32 ending at 0; timesteps: `(n,)` int64 as the scheduler's;
    second_order: `(n,)` bool, the steps that take the 2nd-order multistep update;
    solver_type: "midpoint" or "heun" (the 2nd-order formula).
    """

    sigmas: np.ndarray
    timesteps: np.ndarray
    second_order: np.ndarray
    solver_type: str = "midpoint"

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    @classmethod
    def from_config(cls, config: Mapping[str, Any], num_steps: int = DEFAULT_STEPS,
                    flow_shift: float | None = None) -> SanaSchedule:
        """From a scheduler_config.json dict (diffusers' defaults for absent keys); `flow_shift`
        overrides the config's. Raises ValueError for settings this sampler does not implement."""
        get = config.get
        if not get("use_flow_sigmas", False):
            raise ValueError("use_flow_sigmas must be true (SANA's flow-matching schedule)")
        for key, default, want in (("prediction_type", "epsilon", "flow_prediction"),
                                   ("algorithm_type", "dpmsolver++", "dpmsolver++"),
                                   ("final_sigmas_type", "zero", "zero")):
            if get(key, default) != want:
                raise ValueError(f"{key}={get(key, default)!r} is not supported (only {want!r})")
        for key in _MUST_BE_FALSE:
            if get(key, False):
                raise ValueError(f"{key}=true is not supported")
        order = int(get("solver_order", 2))
        solver_type = get("solver_type", "midpoint")
        if order not in (1, 2) or solver_type not in ("midpoint", "heun"):
            raise ValueError(f"solver_order={order}, solver_type={solver_type!r}: only orders "
                             "1 and 2 with the midpoint or heun formula are supported")
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        shift = float(get("flow_shift", 1.0) if flow_shift is None else flow_shift)
        n_train = int(get("num_train_timesteps", 1000))
        s = 1.0 - np.linspace(1.0, 1.0 / n_train, num_steps + 1)
        s = np.flip(shift * s / (1.0 + (shift - 1.0) * s))[:-1].copy()
        timesteps = (s * n_train).astype(np.int64)
        sigmas = np.concatenate([s, [0.0]]).astype(np.float32)
        # step() takes the first-order update at the first step (no previous x0) and, with
        # final_sigmas_type="zero", always at the last one.
        second = np.arange(num_steps) > 0
        second[-1] = False
        if order == 1:
            second[:] = False
        return cls(sigmas, timesteps, second, solver_type)

    def model_timesteps(self, timestep_scale: float = 1.0) -> np.ndarray:
        """`(n,)` float32: what SanaPipeline passes the transformer, `t * timestep_scale`."""
        return (self.timesteps.astype(np.float32) * np.float32(timestep_scale)).astype(np.float32)


def _lambda(sigma: jax.Array) -> jax.Array:
    """log-SNR of a flow sigma: log(alpha) - log(sigma) with alpha = 1 - sigma (+inf at 0)."""
    return jnp.log(1.0 - sigma) - jnp.log(sigma)


def flow_dpm_solver_step(sample: jax.Array, velocity: jax.Array, x0_prev: jax.Array,
                         sigmas: jax.Array, i: jax.Array, second_order: jax.Array,
                         solver_type: str = "midpoint") -> tuple[jax.Array, jax.Array]:
    """One `DPMSolverMultistepScheduler.step` (dpmsolver++, flow_prediction), pure jnp.

    sample, velocity, x0_prev: `(b, c, h, w)` (x0_prev: the previous step's x0, ignored when
    `second_order` is false); sigmas `(n + 1,)` float32; i: the step index (scalar int);
    second_order: scalar bool. Returns `(next sample, this step's x0)` float32.
    """
    sample = sample.astype(jnp.float32)
    sigma_prev = sigmas[jnp.maximum(i - 1, 0)]
    sigma_s, sigma_t = sigmas[i], sigmas[i + 1]
    x0 = sample - sigma_s * velocity.astype(jnp.float32)
    alpha_t = 1.0 - sigma_t
    lam_s = _lambda(sigma_s)
    h = _lambda(sigma_t) - lam_s
    # first order (DDIM-like): x_t = (sigma_t / sigma_s) x - alpha_t (e^-h - 1) x0
    c0 = -alpha_t * (jnp.exp(-h) - 1.0)
    # 2nd order adds a multiple of D1 = (x0 - x0_prev) / r0, r0 = h_0 / h. At the last step
    # (sigma_t = 0, h = inf) or the first (h_0 = 0) this is inf/nan, but never selected.
    r0 = (lam_s - _lambda(sigma_prev)) / h
    if solver_type == "midpoint":
        c1 = 0.5 * c0 / r0
    else:  # heun
        c1 = alpha_t * ((jnp.exp(-h) - 1.0) / h + 1.0) / r0
    c1 = jnp.where(second_order, c1, 0.0)
    return (sigma_t / sigma_s) * sample + c0 * x0 + c1 * (x0 - x0_prev), x0


def flow_dpm_solve(velocity: Callable[[jax.Array, jax.Array], jax.Array], latents: jax.Array,
                   sigmas: jax.Array, second_order: jax.Array,
                   solver_type: str = "midpoint", trajectory: bool = False) -> Any:
    """The scheduler's loop as one `lax.fori_loop`: `velocity(i, x) -> v` (same shape as x) at
    step i; latents `(b, c, h, w)`; sigmas `(n + 1,)`; second_order `(n,)` bool. Carries
    (x, previous x0) in float32; returns the final x `(b, c, h, w)` float32. Traceable.
    trajectory: also return the sample before every step, `(n, b, c, h, w)` (a `lax.scan`)."""
    x = latents.astype(jnp.float32)

    def body(i, carry):
        x, x0_prev = carry
        return flow_dpm_solver_step(x, velocity(i, x), x0_prev, sigmas, i, second_order[i],
                                    solver_type)

    if trajectory:
        (x, _), xs = jax.lax.scan(lambda c, i: (body(i, c), c[0]), (x, jnp.zeros_like(x)),
                                  jnp.arange(second_order.shape[0]))
        return x, xs
    x, _ = jax.lax.fori_loop(0, second_order.shape[0], body, (x, jnp.zeros_like(x)))
    return x


def _velocity(model: Any, latents, timesteps, ctx, mask, guidance_scale, cfg: bool):
    """velocity(i, x): the model's flow velocity at step i, guided on the doubled batch."""
    b, c = latents.shape[:2]

    def velocity(i, x):
        xin = jnp.concatenate([x, x]) if cfg else x
        t = jnp.full((xin.shape[0],), timesteps[i], jnp.float32)
        out = model(hidden_states=xin.astype(ctx.dtype), encoder_hidden_states=ctx, timestep=t,
                    encoder_attention_mask=mask).astype(jnp.float32)
        if cfg:
            out = out[:b] + guidance_scale * (out[b:] - out[:b])
        return out[:, :c] if out.shape[1] == 2 * c else out  # learned sigma: drop the 2nd half

    return velocity


@functools.partial(jax.jit, static_argnames=("graphdef", "solver_type", "cfg", "trajectory"))
def _sample(graphdef, state, latents, sigmas, timesteps, second_order, ctx, mask,
                 guidance_scale, *, solver_type: str, cfg: bool, trajectory: bool = False):
    velocity = _velocity(nnx.merge(graphdef, state), latents, timesteps, ctx, mask,
                         guidance_scale, cfg)
    return flow_dpm_solve(velocity, latents, sigmas, second_order, solver_type, trajectory)


def _sample_eager(model, latents, sigmas, timesteps, second_order, ctx, mask, guidance_scale,
                  *, solver_type: str, cfg: bool, trajectory: bool = False):
    """`_sample` step by step in Python, for a model that runs eagerly (one block in memory
    at a time, `pqjax.engine.streamed`)."""
    velocity = _velocity(model, latents, timesteps, ctx, mask, guidance_scale, cfg)
    x = latents.astype(jnp.float32)
    x0_prev, xs = jnp.zeros_like(x), []
    for i in range(second_order.shape[0]):
        xs.append(x)
        x, x0_prev = flow_dpm_solver_step(x, velocity(i, x), x0_prev, sigmas, i, second_order[i],
                                          solver_type)
    return (x, jnp.stack(xs)) if trajectory else x


def sana_sample(model: nnx.Module, latents: jax.Array, schedule: SanaSchedule,
                encoder_hidden_states: jax.Array, encoder_attention_mask: jax.Array | None = None,
                negative_encoder_hidden_states: jax.Array | None = None,
                negative_encoder_attention_mask: jax.Array | None = None,
                guidance_scale: float = DEFAULT_GUIDANCE, *, trajectory: bool = False) -> Any:
    """Denoise `latents (b, c, h, w)` (the starting noise) as SanaPipeline does; returns the final
    latents `(b, c, h, w)` float32 (with `trajectory`: and the latents before every step,
    `(n, b, c, h, w)`, the transformer's inputs for calibration).

    encoder_hidden_states `(b, s, caption_channels)` in the model's dtype, with its
    `encoder_attention_mask (b, s)` (1 = token, 0 = padding; None = all tokens);
    the negative (unconditional) pair has the same shapes and is needed iff guidance_scale > 1
    (classifier-free guidance on the doubled batch). guidance_scale is traced: changing it does
    not recompile, only a new shape, schedule length or CFG on/off does.
    """
    model = for_sampling(model)  # one kept on disk loads now, after the prompts' encoding
    config = getattr(model, "config", None)
    if getattr(config, "guidance_embeds", False):
        raise ValueError("guidance-embedding models (SANA-Sprint) use a different sampler")
    cfg = guidance_scale > 1.0
    ctx, mask = encoder_hidden_states, encoder_attention_mask
    if cfg:
        if negative_encoder_hidden_states is None:
            raise ValueError("guidance_scale > 1 needs negative_encoder_hidden_states")
        if negative_encoder_hidden_states.shape != ctx.shape:
            raise ValueError(f"negative captions {negative_encoder_hidden_states.shape} must be "
                             f"shaped as the captions {ctx.shape} (pad both to one length)")
        if (mask is None) != (negative_encoder_attention_mask is None):
            raise ValueError("give both attention masks or neither")
        ctx = jnp.concatenate([negative_encoder_hidden_states.astype(ctx.dtype), ctx])
        if mask is not None:
            mask = jnp.concatenate([jnp.asarray(negative_encoder_attention_mask),
                                    jnp.asarray(mask)])
    timesteps = schedule.model_timesteps(getattr(config, "timestep_scale", 1.0))
    args = (jnp.asarray(latents), jnp.asarray(schedule.sigmas), jnp.asarray(timesteps),
            jnp.asarray(schedule.second_order), ctx, None if mask is None else jnp.asarray(mask),
            jnp.float32(guidance_scale))
    kw = dict(solver_type=schedule.solver_type, cfg=cfg, trajectory=trajectory)
    if getattr(model, "eager", False):
        return _sample_eager(model, *args, **kw)
    graphdef, state = nnx.split(model)
    return _sample(graphdef, state, *args, **kw)
