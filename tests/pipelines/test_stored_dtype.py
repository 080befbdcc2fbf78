"""Weights load in their checkpoint's own dtype by default (bf16 for FLUX.1-dev), not float32:
a bf16 pipeline holds half the bytes of a float32 load of the same folder."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import convert  # noqa: E402
import pqjax  # noqa: E402
from convert.loader import stored_dtype  # noqa: E402
from pqjax.pipelines.components import tree_bytes  # noqa: E402
from pqjax.pipelines.flow import pack_latents  # noqa: E402
from tests.pipelines.test_flux_pipeline import tiny_flux_pipeline  # noqa: E402


def _dtypes(module) -> set:
    from flax import nnx

    return {x.dtype for x in jax.tree.leaves(nnx.state(module))}


class _Header:
    """A WeightSource of shapes and dtypes only."""

    def __init__(self, entries):
        self.entries = entries

    def dtype(self, key):
        return np.dtype(self.entries[key][1])

    def shape(self, key):
        return self.entries[key][0]


@pytest.mark.parametrize("stored,held", [
    (ml_dtypes.bfloat16, ml_dtypes.bfloat16), (np.float16, np.float16), (np.float32, np.float32),
    (np.float64, np.float32), (ml_dtypes.float8_e4m3fn, ml_dtypes.bfloat16),
])
def test_stored_dtype_is_the_bulk_of_the_parameters(stored, held):
    # a few float32 norms beside the bulk, and an integer buffer, do not decide
    source = _Header({"w": ((64, 64), stored), "norm": ((64,), np.float32),
                      "ids": ((9,), np.int64)})
    assert stored_dtype(source, ["w", "norm", "ids"]) == np.dtype(held)
    assert stored_dtype(source, []) == np.float32


def test_bf16_pipeline_loads_as_bf16(tmp_path):
    ref = tiny_flux_pipeline(tmp_path, guidance_embeds=True)
    ref.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    pipe = pqjax.load_pipeline(tmp_path / "bf16")
    enc = pipe.text_encoder
    for part in (pipe.transformer, enc.clip, enc.t5, pipe.decoder.vae):
        assert _dtypes(part) == {jnp.dtype(jnp.bfloat16)}, type(part).__name__
    f32 = pqjax.load_pipeline(tmp_path / "bf16", dtype=jnp.float32)
    assert _dtypes(f32.transformer) == {jnp.dtype(jnp.float32)}
    assert 2 * tree_bytes(pipe.transformer) == tree_bytes(f32.transformer)
    folder = tmp_path / "bf16" / "transformer"
    assert convert.weight_bytes(folder) == tree_bytes(pipe.transformer)
    # Images: a random tiny model drifts far in bf16 (diffusers' own bf16 pipeline moves by
    # ~0.2 RMS from float32 here), so the bound is diffusers' drift on the same folder and
    # latents: a bf16 load must be no further from float32 than diffusers' bf16 pipeline is.
    prompts, h, w, steps = ["a photo of the cat"], 32, 32, 2
    noise = pipe.initial_noise(1, seed=0, height=h, width=w)
    latents = torch.from_numpy(np.asarray(pack_latents(noise)))
    run = dict(height=h, width=w, num_inference_steps=steps, guidance_scale=3.5,
               output_type="np", max_sequence_length=512)
    with torch.no_grad():
        ref16 = ref.to(torch.bfloat16)(prompts, latents=latents.to(torch.bfloat16), **run).images
        ref32 = ref.to(torch.float32)(prompts, latents=latents, **run).images
    got = pipe.generate(prompts, num_steps=steps, guidance=3.5, height=h, width=w, latents=noise)
    assert got.shape == ref32.shape and np.isfinite(got).all()

    def rms(a, b):
        return float(np.sqrt(np.mean((a - b) ** 2)))

    assert rms(got, ref32) <= rms(ref16, ref32), (rms(got, ref32), rms(ref16, ref32))
