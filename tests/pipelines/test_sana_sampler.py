"""SANA's flow DPM-Solver++ sampler against diffusers' DPMSolverMultistepScheduler and the
SanaPipeline loop run with diffusers' modules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import convert  # noqa: E402
from pqjax.pipelines import sana as sana_pipe  # noqa: E402
from pqjax.pipelines.sana import SanaSchedule, flow_dpm_solve, sana_sample  # noqa: E402
from tests.models.test_sana import TINY_QK, torch_model  # noqa: E402
from tests.parity import assert_close_rel  # noqa: E402

# SANA1.5_1.6B_1024px_diffusers/scheduler/scheduler_config.json (the keys that matter).
SANA_SCHEDULER = {
    "algorithm_type": "dpmsolver++",
    "euler_at_final": False,
    "final_sigmas_type": "zero",
    "flow_shift": 3.0,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "solver_order": 2,
    "solver_type": "midpoint",
    "use_flow_sigmas": True,
}


def diffusers_scheduler(config: dict, steps: int):
    sched = diffusers.DPMSolverMultistepScheduler(**config)
    sched.set_timesteps(steps)
    return sched


@pytest.mark.parametrize("steps", [1, 2, 5, 20, 37])
@pytest.mark.parametrize("shift", [1.0, 3.0, 6.0])
def test_schedule_matches_set_timesteps(steps, shift):
    config = {**SANA_SCHEDULER, "flow_shift": shift}
    ref = diffusers_scheduler(config, steps)
    sched = SanaSchedule.from_config(dict(ref.config), steps)
    assert sched.sigmas.dtype == np.float32 and sched.sigmas.shape == (steps + 1,)
    np.testing.assert_allclose(sched.sigmas, ref.sigmas.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(sched.timesteps, ref.timesteps.numpy())
    # the flow_shift argument overrides the config's
    again = SanaSchedule.from_config(SANA_SCHEDULER, steps, flow_shift=shift)
    np.testing.assert_array_equal(again.sigmas, sched.sigmas)
    assert sched.model_timesteps().dtype == np.float32
    assert not sched.second_order[0] and not sched.second_order[-1]
    assert sched.second_order[1:-1].all()


@pytest.mark.parametrize("steps", [1, 2, 5, 20])
@pytest.mark.parametrize(
    "variant",
    [{}, {"solver_type": "heun"}, {"solver_order": 1}, {"lower_order_final": False}],
    ids=["sana", "heun", "order1", "no-lower-order-final"],
)
def test_update_matches_scheduler_step(steps, variant):
    """The same random model outputs through `scheduler.step` and through the jnp loop."""
    config = {**SANA_SCHEDULER, **variant}
    ref = diffusers_scheduler(config, steps)
    gen = torch.Generator().manual_seed(steps)
    x = torch.randn(2, 3, 4, 5, generator=gen)
    vs = torch.randn(steps, 2, 3, 4, 5, generator=gen)
    start = x.clone()
    for i, t in enumerate(ref.timesteps):
        x = ref.step(vs[i], t, x, return_dict=False)[0]
    sched = SanaSchedule.from_config(config, steps)
    v_j = jnp.asarray(vs.numpy())
    run = jax.jit(lambda x0, s, o: flow_dpm_solve(lambda i, _: v_j[i], x0, s, o,
                                                  sched.solver_type))
    out = run(jnp.asarray(start.numpy()), jnp.asarray(sched.sigmas),
              jnp.asarray(sched.second_order))
    assert out.dtype == jnp.float32
    assert_close_rel(np.asarray(out), x.numpy(), 1e-5, f"{steps}-step DPM-Solver++ loop")


@pytest.mark.parametrize(
    "change, field",
    [
        ({"use_flow_sigmas": False}, "use_flow_sigmas"),
        ({"prediction_type": "epsilon"}, "prediction_type"),
        ({"algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
        ({"final_sigmas_type": "sigma_min"}, "final_sigmas_type"),
        ({"solver_order": 3}, "solver_order"),
        ({"use_karras_sigmas": True}, "use_karras_sigmas"),
        ({"thresholding": True}, "thresholding"),
    ],
)
def test_unsupported_scheduler_settings_raise(change, field):
    with pytest.raises(ValueError, match=field):
        SanaSchedule.from_config({**SANA_SCHEDULER, **change}, 4)


def test_matches_the_pipeline_loop(tmp_path):
    """SanaPipeline's loop (CFG on the doubled batch, scheduler.step) vs sana_sample: batch 2,
    4 steps, guidance 4.5, padded captions."""
    cfg = TINY_QK
    tmodel = torch_model(cfg, seed=11)
    tmodel.save_pretrained(tmp_path)
    model = convert.load_transformer(tmp_path)
    steps, scale, b, seq = 4, 4.5, 2, 7
    sched_t = diffusers_scheduler(SANA_SCHEDULER, steps)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(b, cfg.in_channels, 6, 8, generator=g) * sched_t.init_noise_sigma
    ctx = torch.randn(b, seq, cfg.caption_channels, generator=g)
    neg = torch.randn(b, seq, cfg.caption_channels, generator=g)
    mask = (torch.arange(seq)[None] < torch.tensor([[7], [4]])).long()
    neg_mask = (torch.arange(seq)[None] < torch.tensor([[3], [2]])).long()
    x = latents.clone()
    with torch.no_grad():
        both, both_mask = torch.cat([neg, ctx]), torch.cat([neg_mask, mask])
        for t in sched_t.timesteps:
            timestep = t.expand(2 * b) * tmodel.config.timestep_scale
            v = tmodel(torch.cat([x, x]), encoder_hidden_states=both,
                       encoder_attention_mask=both_mask, timestep=timestep,
                       return_dict=False)[0].float()
            v_u, v_c = v.chunk(2)
            x = sched_t.step(v_u + scale * (v_c - v_u), t, x, return_dict=False)[0]
    schedule = SanaSchedule.from_config(dict(sched_t.config), steps)
    args = (model, jnp.asarray(latents.numpy()), schedule, jnp.asarray(ctx.numpy()),
            jnp.asarray(mask.numpy()), jnp.asarray(neg.numpy()), jnp.asarray(neg_mask.numpy()))
    out = sana_sample(*args, guidance_scale=scale)
    assert out.shape == latents.shape and out.dtype == jnp.float32
    assert_close_rel(np.asarray(out), x.numpy(), 1e-4, "SANA 4-step CFG sample")
    # guidance_scale is traced: another value reuses the compiled loop
    compiled = sana_pipe._sample._cache_size()
    other = sana_sample(*args, guidance_scale=2.0)
    assert sana_pipe._sample._cache_size() == compiled
    assert not np.allclose(np.asarray(other), np.asarray(out))


def test_guidance_needs_negative_captions():
    from flax import nnx

    from pqjax.models.sana import SanaTransformer2DModel

    model = SanaTransformer2DModel(TINY_QK, rngs=nnx.Rngs(0))
    sched = SanaSchedule.from_config(SANA_SCHEDULER, 2)
    x = jnp.zeros((1, 4, 2, 2))
    ctx = jnp.zeros((1, 3, TINY_QK.caption_channels))
    with pytest.raises(ValueError, match="negative"):
        sana_sample(model, x, sched, ctx, guidance_scale=4.5)
    # guidance_scale <= 1: no CFG, a single batch, no negatives needed
    assert sana_sample(model, x, sched, ctx, guidance_scale=1.0).shape == x.shape
