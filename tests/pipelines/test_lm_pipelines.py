"""SANA and Z-Image end to end against diffusers' SanaPipeline and ZImagePipeline.

Each pipeline is assembled from tiny random components and written with `save_pretrained`;
`pqjax.load_pipeline` reads that folder. Same prompts (several in one batch), same starting
latents, `output_type="np"`: images must agree within 1e-4 of their scale (the images lie in
[0, 1]). That is the float32 parity bound of each component (tests/models), carried through a
few solver steps that contract rather than amplify differences, and far below what a wrong
mask, token selection, schedule, guidance or latent scaling produces (O(1e-2) and up).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

import pqjax  # noqa: E402
from tests.models.lm_tokenizers import write_gemma_tokenizer, write_qwen_tokenizer  # noqa: E402
from tests.models.test_sana import TINY_QK  # noqa: E402
from tests.models.test_zimage import CONFIGS as ZIMAGE_CONFIGS  # noqa: E402
from tests.models.test_zimage import torch_zimage  # noqa: E402
from tests.parity import assert_close_rel, randomize_  # noqa: E402
from tests.pipelines.test_sana_sampler import SANA_SCHEDULER  # noqa: E402

PROMPTS = ["A red fox in the snow", "an astronaut riding a horse", "a cat"]
LM = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, head_dim=8, pad_token_id=0)


def _random(module, std=0.2):
    randomize_(module.eval(), std=std)
    return module


# Widths that NVFP4's 16-channel groups divide (attention 2 x 16, Mix-FFN hidden 2.5 x 32).
SANA_QUANTIZABLE = dataclasses.replace(TINY_QK, attention_head_dim=16, cross_attention_dim=32,
                                       num_cross_attention_heads=2, cross_attention_head_dim=16)


def tiny_sana(root, transformer_config=TINY_QK, *, sample_size=8, vae_stages=3):
    """A SanaPipeline of tiny random parts in `root / "sana"`; the DC-AE compresses by
    2 ** (vae_stages - 1)."""
    vocab = write_gemma_tokenizer(root / "tok")
    torch.manual_seed(0)
    gemma = _random(transformers.Gemma2Model(transformers.Gemma2Config(
        vocab_size=vocab, sliding_window=64, query_pre_attn_scalar=8, **LM)))
    cfg = dataclasses.replace(transformer_config, caption_channels=32, sample_size=sample_size)
    transformer = _random(diffusers.SanaTransformer2DModel(**dataclasses.asdict(cfg)))
    n = vae_stages
    channels = (8,) + (16,) * (n - 1)
    vae = _random(diffusers.AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=4,
        encoder_block_out_channels=channels, encoder_layers_per_block=(1,) * n,
        encoder_qkv_multiscales=((),) * n, decoder_block_out_channels=channels,
        decoder_layers_per_block=(1,) * n, decoder_qkv_multiscales=((),) * (n - 1) + ((3,),),
        decoder_block_types=("ResBlock",) * (n - 1) + ("EfficientViTBlock",),
        upsample_block_type="interpolate", scaling_factor=0.41407), std=0.1)
    pipe = diffusers.SanaPipeline(
        tokenizer=transformers.AutoTokenizer.from_pretrained(root / "tok"), text_encoder=gemma,
        vae=vae, transformer=transformer,
        scheduler=diffusers.DPMSolverMultistepScheduler(**SANA_SCHEDULER))
    pipe.save_pretrained(root / "sana")
    return pipe


def tiny_zimage(root):
    vocab = write_qwen_tokenizer(root / "tok")
    torch.manual_seed(0)
    qwen = _random(transformers.Qwen3Model(transformers.Qwen3Config(vocab_size=vocab, **LM)))
    transformer = torch_zimage({**ZIMAGE_CONFIGS["small_qknorm"], "cap_feat_dim": 32}, std=0.1)
    vae = _random(diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=4, scaling_factor=0.3611, shift_factor=0.1159),
        std=0.1)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)
    pipe = diffusers.ZImagePipeline(
        tokenizer=transformers.AutoTokenizer.from_pretrained(root / "tok"), text_encoder=qwen,
        vae=vae, transformer=transformer, scheduler=sched)
    pipe.save_pretrained(root / "zimage")
    return pipe


@pytest.mark.parametrize("guidance", [4.5, 1.0])  # with and without classifier-free guidance
def test_sana_pipeline_matches_diffusers(tmp_path, guidance):
    ref_pipe = tiny_sana(tmp_path)
    latents = torch.randn(len(PROMPTS), 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref_pipe(list(PROMPTS), height=32, width=32, num_inference_steps=3,
                        guidance_scale=guidance, latents=latents.clone(), output_type="np",
                        use_resolution_binning=False).images
    pipe = pqjax.load_pipeline(tmp_path / "sana")
    got = pipe.generate(PROMPTS, height=32, width=32, num_steps=3, guidance=guidance,
                        latents=latents.numpy())
    assert got.shape == want.shape == (3, 32, 32, 3)
    assert_close_rel(got, want, 1e-4, f"SANA images, guidance {guidance}")
    assert np.abs(got - want).max() < 1e-4  # absolute too: both lie in [0, 1]


def test_zimage_pipeline_matches_diffusers(tmp_path):
    ref_pipe = tiny_zimage(tmp_path)
    latents = torch.randn(len(PROMPTS), 4, 8, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # a copy: ZImagePipeline writes the chat-formatted prompts back into the caller's list
        want = ref_pipe(list(PROMPTS), height=16, width=12, num_inference_steps=4,
                        guidance_scale=0.0, latents=latents.clone(), output_type="np").images
    pipe = pqjax.load_pipeline(tmp_path / "zimage")
    got = pipe.generate(PROMPTS, height=16, width=12, num_steps=4, latents=latents.numpy())
    assert got.shape == want.shape == (3, 16, 12, 3)
    assert_close_rel(got, want, 1e-4, "Z-Image images")
    with pytest.raises(ValueError, match="height must be a positive multiple of 4"):
        pipe.generate(PROMPTS[:1], height=10, width=12)


def _check_quantized(qpipe, pipe, prompts, **kw):
    """Every quantizable Linear became a QuantLinear with a report row, and the images stay
    close to full precision (a tiny random model keeps a rough likeness at W4A4)."""
    from flax import nnx

    from pqjax.layers import QuantLinear

    assert qpipe.report is not None and qpipe.quant_config is not None
    quantized = [p for p, m in nnx.iter_graph(qpipe.transformer) if isinstance(m, QuantLinear)]
    assert quantized and len(qpipe.report.layers) == len(quantized)
    fp, q = pipe.generate(prompts, **kw), qpipe.generate(prompts, **kw)
    assert np.isfinite(q).all() and q.shape == fp.shape
    err = np.sqrt(np.mean((q - fp) ** 2))
    assert 0 < err < 0.25, err  # changed by quantization, yet far from noise (std ~0.3)
    return q


def _round_trip(qpipe, images, prompts, tmp_path, **kw):
    """save -> restore -> generate: the same images, bit for bit (the same computation)."""
    out = pqjax.save(qpipe, tmp_path / "ckpt")
    back = pqjax.restore(out)
    assert type(back) is type(qpipe) and back.quant_config == qpipe.quant_config
    np.testing.assert_array_equal(back.generate(prompts, **kw), images)


@pytest.fixture(scope="module")
def sana_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("sana_q")
    tiny_sana(root, SANA_QUANTIZABLE)
    return root / "sana"


def test_sana_convert_and_quantize(sana_folder, tmp_path):
    folder = sana_folder
    pipe = pqjax.load_pipeline(folder)
    assert (pipe.height, pipe.width) == (32, 32)  # sample_size 8 x the DC-AE's factor 4
    batches = pipe.calibration_batches(PROMPTS[:2], num_steps=2)
    assert len(batches) == 2 and batches[0]["hidden_states"].shape == (4, 4, 8, 8)  # CFG: 2 x 2
    qpipe = pqjax.convert_and_quantize(folder, pqjax.QuantConfig(), PROMPTS[:2], calib_steps=2,
                                       progress=False)
    images = _check_quantized(qpipe, pipe, PROMPTS[2:], num_steps=2)
    _round_trip(qpipe, images, PROMPTS[2:], tmp_path, num_steps=2)


def test_zimage_quantize_on_its_trajectories(tmp_path):
    from pqjax.api import calibrate_pipeline, quantize_pipeline

    tiny_zimage(tmp_path)
    pipe = pqjax.load_pipeline(tmp_path / "zimage")
    # the size, steps and prompts of test_zimage_through_the_cli: the calibration programs
    # compiled here serve both (non-square, as the tiny model allows)
    kw = dict(num_steps=2, height=16, width=24)
    calib = calibrate_pipeline(pipe, PROMPTS[:2], progress=False, **kw)
    qpipe = quantize_pipeline(pipe, calib, pqjax.QuantConfig())
    images = _check_quantized(qpipe, pipe, PROMPTS[2:], **kw)
    _round_trip(qpipe, images, PROMPTS[2:], tmp_path, **kw)


def _through_the_cli(folder, tmp_path, size, generate_args=()):
    """quantize (with its comparison) -> generate -> report, as a user runs them."""
    import json

    from PIL import Image

    from pqjax.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n")
    ckpt, image = tmp_path / "q", tmp_path / "fox.png"
    sizes = ["--steps", "2", "--height", str(size[0]), "--width", str(size[1])]
    assert main(["quantize", str(folder), "--out", str(ckpt), "--rows", "32",
                 "--calib-prompts", str(prompts), "--no-compile-cache", *sizes]) == 0
    metrics = json.loads((ckpt / "compare" / "metrics.json").read_text())
    assert set(metrics) == {"full_precision", "W4A4_nvfp4_rtn", "W4A4_nvfp4_permuquant"}
    assert all(np.isfinite(m["psnr_vs_fp"]) for k, m in metrics.items() if k != "full_precision")
    assert metrics["W4A4_nvfp4_permuquant"]["reused"]  # the saved model, not quantized again
    assert (ckpt / "compare" / "index.html").is_file()
    assert main(["generate", str(ckpt), PROMPTS[0], *sizes, "--out", str(image),
                 "--no-compile-cache", *generate_args]) == 0
    assert Image.open(image).size == (size[1], size[0])
    assert main(["report", str(ckpt)]) == 0


def test_sana_through_the_cli(sana_folder, tmp_path):
    _through_the_cli(sana_folder, tmp_path, (32, 32))


def test_zimage_through_the_cli(tmp_path):
    """At a size the tiny model can take (its default is the real model's 1024 px), with
    guidance and a memory budget that keeps Qwen3 on disk."""
    tiny_zimage(tmp_path)
    _through_the_cli(tmp_path / "zimage", tmp_path, (16, 24),
                     ["--guidance", "2", "--max-memory", "1KB"])


def test_noise_takes_any_seed_like_the_flux_pipeline(sana_folder):
    """Seeds past 32 bits are honoured (not cut, not refused), as `pipeline.seed_key` does."""
    import jax

    from pqjax.pipelines.pipeline import seed_key

    pipe = pqjax.load_pipeline(sana_folder)
    big = pipe.initial_noise(2, 2**32 + 5, 32, 32)
    assert big.shape == (2, 4, 8, 8)
    assert not np.array_equal(big, pipe.initial_noise(2, 5, 32, 32))
    want = jax.random.normal(jax.random.fold_in(seed_key(2**32 + 5), 1), (4, 8, 8))
    np.testing.assert_array_equal(big[1], want)  # the same draw, the same computation
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1"):
        pipe.generate(PROMPTS[:1], num_steps=0)
