"""End to end against diffusers' FluxPipeline assembled from tiny random components.

Same folder (written by FluxPipeline.save_pretrained), same starting noise: the JAX pipeline
must reproduce prompt encoding, packing, img_ids, the shifted schedule, guidance embedding,
Euler steps, unpacking, latent scaling and VAE decoding.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

import pqjax  # noqa: E402
from pqjax.pipelines.flow import pack_latents  # noqa: E402
from tests.models.test_clip import tiny_clip  # noqa: E402
from tests.models.test_flux import torch_flux  # noqa: E402
from tests.models.test_t5 import tiny_t5  # noqa: E402
from tests.models.test_tokenizers import write_clip_tokenizer, write_t5_tokenizer  # noqa: E402
from tests.parity import assert_close_rel, randomize_  # noqa: E402

PROMPTS = ["a photo of the cat", "the dog and a cat"]


def tiny_flux_pipeline(root, guidance_embeds: bool):
    clip_vocab = write_clip_tokenizer(root / "tok_clip")
    t5_vocab = write_t5_tokenizer(root / "tok_t5")
    clip = tiny_clip(vocab_size=clip_vocab, bos_token_id=clip_vocab - 2, eos_token_id=2,
                     pad_token_id=1)
    t5 = tiny_t5(vocab_size=t5_vocab, relative_attention_num_buckets=32,
                 relative_attention_max_distance=128)
    torch.manual_seed(1)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=0.3611, shift_factor=0.1159,
    ).eval()
    randomize_(vae, std=0.1, seed=1)
    transformer = torch_flux(dict(
        num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=t5.config.d_model, pooled_projection_dim=clip.config.hidden_size,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6), in_channels=16,
    ), seed=2)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=guidance_embeds, base_image_seq_len=256,
        max_image_seq_len=4096, base_shift=0.5, max_shift=1.15,
    )
    pipe = diffusers.FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=clip, text_encoder_2=t5,
        tokenizer=transformers.CLIPTokenizer.from_pretrained(root / "tok_clip"),
        tokenizer_2=transformers.T5TokenizerFast.from_pretrained(root / "tok_t5"),
        transformer=transformer,
    )
    pipe.save_pretrained(root / "pipe")
    return pipe


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_matches_diffusers_flux_pipeline(tmp_path, variant):
    dev = variant == "dev"
    ref_pipe = tiny_flux_pipeline(tmp_path, guidance_embeds=dev)
    ours = pqjax.load_pipeline(tmp_path / "pipe")
    assert ours.defaults.vae_scale_factor == 2 and ours.defaults.latent_channels == 4
    assert ours.text_encoder.max_sequence_length == (512 if dev else 256)
    height, width, steps, guidance = 24, 16, 3, 3.5
    noise = ours.initial_noise(len(PROMPTS), seed=7, height=height, width=width)  # (b, c, h, w)
    with torch.no_grad():
        ref = ref_pipe(
            PROMPTS, height=height, width=width, num_inference_steps=steps,
            guidance_scale=guidance, output_type="np",
            latents=torch.from_numpy(np.asarray(pack_latents(noise))),
            max_sequence_length=ours.text_encoder.max_sequence_length,
        ).images
    out = ours.generate(PROMPTS, num_steps=steps, guidance=guidance, height=height,
                        width=width, latents=noise)
    assert out.shape == ref.shape == (2, height, width, 3)
    assert_close_rel(out, ref, 1e-4, f"FLUX.1-{variant} pipeline images")


def test_quantized_flux_pipeline_saves_and_restores(tmp_path):
    tiny_flux_pipeline(tmp_path, guidance_embeds=True)
    fp = pqjax.load_pipeline(tmp_path / "pipe")
    calib = pqjax.calibrate_pipeline(fp, ["a cat", "a dog"], num_steps=2, height=16, width=16,
                                     n_rows=32, progress=False)
    q = pqjax.quantize_pipeline(fp, calib, pqjax.QuantConfig())
    kw = dict(num_steps=2, height=16, width=16, seed=3)
    images = q.generate(PROMPTS, **kw)
    restored = pqjax.restore(pqjax.save(q, tmp_path / "q"))
    np.testing.assert_array_equal(restored.generate(PROMPTS, **kw), images)
