"""The embedded tiny FLUX digits model (pqjax/assets/tiny-flux-digits), as committed.

Written by `python -m examples.train_tiny_flux`; these checks need no training.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import convert
import pqjax
from pqjax.models.text_table import PromptTable
from pqjax.pipelines.flow import (
    FlowMatchEuler,
    euler_sample,
    latent_image_ids,
    pack_latents,
    unpack_latents,
)
from tests.parity import assert_close_rel

ASSET = Path(pqjax.__file__).resolve().parent / "assets" / "tiny-flux-digits"
MAX_BYTES = 10 * 1024 * 1024


def test_layout_and_size():
    for rel in ("model_index.json", "pipeline.json", "README.md", "transformer/config.json",
                "transformer/diffusion_pytorch_model.safetensors", "text_encoder/prompts.json",
                "text_encoder/model.safetensors", "scheduler/scheduler_config.json"):
        assert (ASSET / rel).is_file(), rel
    total = sum(p.stat().st_size for p in ASSET.rglob("*") if p.is_file())
    assert total <= MAX_BYTES, f"asset is {total / 2**20:.2f} MiB"
    index = json.loads((ASSET / "model_index.json").read_text())
    assert index["_class_name"] == "TinyFluxDigitsPipeline"
    assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    assert index["text_encoder"] == ["pqjax", "PromptTable"]
    assert convert.resolve(ASSET, "transformer") == ASSET / "transformer"


def test_pipeline_json_documents_defaults_and_facts():
    p = json.loads((ASSET / "pipeline.json").read_text())
    assert isinstance(p["num_inference_steps"], int) and p["num_inference_steps"] >= 1
    assert 1.0 <= p["guidance_scale"] <= 10.0
    assert (p["height"], p["width"], p["latent_channels"], p["vae_scale_factor"]) == (16, 16, 1, 1)
    assert p["value_range"] == [-1.0, 1.0]
    t = p["training"]
    for key in ("seed", "parameters", "teacher", "distill"):
        assert key in t, key
    for phase in ("teacher", "distill"):
        assert {"steps", "wall_s", "cpu_s", "final_loss"} <= set(t[phase]), phase
    e = p["evaluation"]
    assert e["accuracy"] >= 0.9 and len(e["per_digit"]) == 10 and e["frechet"] >= 0
    FlowMatchEuler.from_config(json.loads((ASSET / "scheduler/scheduler_config.json").read_text()))


@pytest.fixture(scope="module")
def table() -> PromptTable:
    return PromptTable.load(ASSET / "text_encoder")


@pytest.fixture(scope="module")
def model():
    return convert.load_transformer(ASSET)


def test_prompt_table(table, model):
    assert table.encoder_hidden_states.shape[0] == 11 == table.pooled_projections.shape[0]
    assert table.encoder_hidden_states.shape[2] == model.config.joint_attention_dim
    assert table.pooled_projections.shape[1] == model.config.pooled_projection_dim
    assert table.index("a handwritten digit 7") == 7 and table.index("") == 10


def inputs(table: PromptTable) -> dict:
    """A real digit noised to two levels, with its learned conditioning and a guidance value."""
    from pqjax.eval.digits import load_digits16

    images, _ = load_digits16()
    x0 = jnp.asarray(images[:2, None] * 2 - 1)
    noise = jax.random.normal(jax.random.key(0), x0.shape)
    sigma = jnp.asarray([0.3, 0.8], jnp.float32)
    xt = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
    embeds, pooled, txt_ids = table.encode(["a handwritten digit 0", "seven"])
    return dict(hidden_states=pack_latents(xt), encoder_hidden_states=embeds,
                pooled_projections=pooled, timestep=sigma, img_ids=latent_image_ids(16, 16),
                txt_ids=txt_ids, guidance=jnp.asarray([3.5, 1.0], jnp.float32))


def test_diffusers_loads_it_and_agrees(table, model):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    ref_model = diffusers.FluxTransformer2DModel.from_pretrained(ASSET / "transformer").eval()
    feed = inputs(table)
    with torch.no_grad():
        ref = ref_model(**{k: torch.from_numpy(np.array(v)) for k, v in feed.items()}).sample
    out = model(**feed)
    assert out.shape == (2, 64, 4)
    assert_close_rel(np.asarray(out), ref.numpy(), 1e-4, "tiny FLUX vs diffusers")


def test_few_step_sample_is_finite_and_in_range(table, model):
    p = json.loads((ASSET / "pipeline.json").read_text())
    sched = FlowMatchEuler.from_config(
        json.loads((ASSET / "scheduler/scheduler_config.json").read_text()))
    sigmas = sched.sigmas(4, image_seq_len=64)
    embeds, pooled, txt_ids = table.encode(["digit 3", "digit 8"])
    g = jnp.full((2,), p["guidance_scale"], jnp.float32)
    noise = jax.random.normal(jax.random.key(1), (2, 1, 16, 16))

    def velocity(x, t):
        return model(hidden_states=x, encoder_hidden_states=embeds, pooled_projections=pooled,
                     timestep=t, img_ids=latent_image_ids(16, 16), txt_ids=txt_ids, guidance=g)

    x = euler_sample(velocity, pack_latents(noise), jnp.asarray(sigmas),
                     jnp.asarray(sched.model_timesteps(sigmas)))
    img = np.asarray(unpack_latents(x, 16, 16))
    assert img.shape == (2, 1, 16, 16) and np.isfinite(img).all()
    assert -1.5 <= img.min() and img.max() <= 1.5  # trained on [-1, 1]
    assert np.abs(img[0] - img[1]).mean() > 0.05  # the prompt matters
