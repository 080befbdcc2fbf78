"""Z-Image's jitted sampling loop against ZImagePipeline's loop run with diffusers' modules."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import convert  # noqa: E402
from pqjax.pipelines.flow import FlowMatchEuler  # noqa: E402
from pqjax.pipelines.zimage import zimage_sample, zimage_schedule  # noqa: E402
from tests.models.test_zimage import CONFIGS, torch_zimage  # noqa: E402
from tests.parity import assert_close_rel  # noqa: E402


def test_matches_the_pipeline_loop(tmp_path):
    cfg = CONFIGS["small_qknorm"]
    tmodel = torch_zimage(cfg, std=0.1)
    tmodel.save_pretrained(tmp_path)
    model = convert.load_transformer(tmp_path)
    sched_t = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)
    steps = 8
    sigmas = torch.linspace(1.0, 1 / steps, steps).tolist()  # ZImagePipeline's default sigmas
    sched_t.set_timesteps(sigmas=sigmas, mu=0.5)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, cfg["in_channels"], 8, 6, generator=g)
    caps = [torch.randn(n, cfg["cap_feat_dim"], generator=g) for n in (9, 20)]
    x = latents.clone()
    with torch.no_grad():
        for t in sched_t.timesteps:
            timestep = (1000 - t.expand(2)) / 1000
            out = tmodel(list(x.unsqueeze(2).unbind(0)), timestep, caps, return_dict=False)[0]
            noise_pred = -torch.stack([o.float() for o in out]).squeeze(2)
            x = sched_t.step(noise_pred, t, x, return_dict=False)[0]
    sched = FlowMatchEuler.from_config(dict(sched_t.config))
    schedule = zimage_schedule(sched, steps)
    np.testing.assert_array_equal(schedule[0], sched_t.sigmas.numpy())
    padded = jnp.zeros((2, 20, cfg["cap_feat_dim"])).at[0, :9].set(caps[0].numpy())
    padded = padded.at[1].set(caps[1].numpy())
    out = zimage_sample(model, jnp.asarray(latents.numpy()), schedule, padded, jnp.array([9, 20]))
    assert_close_rel(np.asarray(out), x.numpy(), 1e-4, "Z-Image 8-step sample")
