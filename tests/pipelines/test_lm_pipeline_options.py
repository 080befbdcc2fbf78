"""SANA's resolution binning and Z-Image's classifier-free guidance against diffusers.

The pipelines are the tiny random ones of `test_lm_pipelines` (saved with `save_pretrained`,
loaded by `pqjax.load_pipeline`); the images are compared with diffusers' own on the same
prompts and latents, within the same 1e-4 bound and for the same reason (the float32 parity of
each component carried through a few contracting solver steps; a wrong bin, resize, crop,
guidance formula, truncation or normalization moves images by 1e-2 and more).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import pqjax  # noqa: E402
from pqjax.pipelines.aspect_bins import aspect_ratio_bins, bin_size, resize_and_crop  # noqa: E402
from tests.parity import assert_close_rel  # noqa: E402
from tests.pipelines.test_lm_pipelines import PROMPTS, tiny_sana, tiny_zimage  # noqa: E402


def _diffusers_tables():
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
        ASPECT_RATIO_512_BIN,
        ASPECT_RATIO_1024_BIN,
    )
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN
    from diffusers.pipelines.sana.pipeline_sana import ASPECT_RATIO_4096_BIN

    return {16: ASPECT_RATIO_512_BIN, 32: ASPECT_RATIO_1024_BIN, 64: ASPECT_RATIO_2048_BIN,
            128: ASPECT_RATIO_4096_BIN}


@pytest.mark.parametrize("sample_size", [16, 32, 64, 128])
def test_bin_tables_are_diffusers(sample_size):
    """The tables are data: equal to diffusers', key order included (it breaks ties)."""
    want = _diffusers_tables()[sample_size]
    got = aspect_ratio_bins(sample_size)
    assert list(got) == list(want)
    assert got == {k: (int(h), int(w)) for k, (h, w) in want.items()}


def test_bin_choice_and_refusal():
    from diffusers.image_processor import PixArtImageProcessor

    table = _diffusers_tables()[32]
    for h, w in [(1000, 700), (1024, 1024), (512, 2048), (333, 4000), (777, 778), (3000, 10)]:
        assert bin_size(h, w, 32) == PixArtImageProcessor.classify_height_width_bin(
            h, w, ratios=table)
    with pytest.raises(ValueError, match="sample sizes .* not 8"):
        aspect_ratio_bins(8)


@pytest.mark.parametrize("size,new", [((24, 40), (20, 35)), ((16, 16), (40, 24)),
                                      ((30, 20), (30, 20)), ((17, 23), (9, 31))])
def test_resize_and_crop_matches_diffusers(size, new):
    """Exact shapes and crop offsets; values within what float32 sample positions allow. Both
    place output pixel i at (i + 0.5) / scale - 0.5 in float32, computed differently: the
    positions differ by up to a few ulps of the output size (n 2^-24 pixels), which moves a
    2-tap interpolation by at most that times the largest step between neighbouring pixels.
    A wrong centre, crop offset or an antialiasing filter is off by O(0.1)."""
    from diffusers.image_processor import PixArtImageProcessor

    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    want = PixArtImageProcessor.resize_and_crop_tensor(x, new[1], new[0]).numpy()
    got = np.asarray(resize_and_crop(x.numpy(), *new))
    assert got.shape == want.shape == (2, 3, *new)
    a = x.numpy()
    step = max(np.abs(np.diff(a, axis=2)).max(), np.abs(np.diff(a, axis=3)).max())
    n = max(new) * max(new[0] / size[0], new[1] / size[1], 1.0)  # the scaled image's side
    np.testing.assert_allclose(got, want, atol=4 * n * 2.0**-24 * step, rtol=0)


@pytest.fixture(scope="module")
def binned_sana(tmp_path_factory):
    """Sample size 16 (the 512 px table) and a 16x DC-AE: a 300 x 520 request samples the
    384 x 672 bin, 24 x 42 latents."""
    root = tmp_path_factory.mktemp("sana_bins")
    return tiny_sana(root, sample_size=16, vae_stages=5), root / "sana"


def test_sana_resolution_binning_matches_diffusers(binned_sana):
    ref_pipe, folder = binned_sana
    prompts = PROMPTS[:2]
    latents = torch.randn(2, 4, 24, 42, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref_pipe(list(prompts), height=300, width=520, num_inference_steps=2,
                        guidance_scale=4.5, latents=latents.clone(), output_type="np").images
    pipe = pqjax.load_pipeline(folder)
    assert pipe.image_size(300, 520) == (384, 672)
    got = pipe.generate(prompts, height=300, width=520, num_steps=2, latents=latents.numpy())
    assert got.shape == want.shape == (2, 300, 520, 3)
    assert_close_rel(got, want, 1e-4, "SANA images, binned")
    assert np.abs(got - want).max() < 1e-4
    # binning off: the size as given, which must then be a multiple of the DC-AE's factor
    assert pipe.image_size(300, 520, resolution_binning=False) == (300, 520)
    with pytest.raises(ValueError, match="height must be a positive multiple of 16"):
        pipe.generate(prompts[:1], height=300, width=520, resolution_binning=False)
    # latents of another size are refused, not silently used
    with pytest.raises(ValueError, match=r"needs \(2, 4, 24, 42\)"):
        pipe.generate(prompts, height=300, width=520, latents=np.zeros((2, 4, 18, 32)))
    batches = pipe.calibration_batches(prompts, num_steps=2, height=300, width=520)
    assert batches[0]["hidden_states"].shape == (4, 4, 24, 42)  # binned, CFG-doubled


@pytest.fixture(scope="module")
def zimage(tmp_path_factory):
    root = tmp_path_factory.mktemp("zimage_cfg")
    ref_pipe = tiny_zimage(root)
    return ref_pipe, pqjax.load_pipeline(root / "zimage")


@pytest.mark.parametrize("options", [
    dict(guidance_scale=2.0),
    dict(guidance_scale=1.0, negative_prompt=["blurry", "low quality", ""]),
    dict(guidance_scale=3.0, cfg_truncation=0.6, cfg_normalization=1.05),
])
def test_zimage_guidance_matches_diffusers(zimage, options):
    ref_pipe, pipe = zimage
    latents = torch.randn(len(PROMPTS), 4, 8, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref_pipe(list(PROMPTS), height=16, width=12, num_inference_steps=4,
                        latents=latents.clone(), output_type="np",
                        **{k: (list(v) if isinstance(v, list) else v)
                           for k, v in options.items()}).images
    kw = {("guidance" if k == "guidance_scale" else k): v for k, v in options.items()}
    got = pipe.generate(PROMPTS, height=16, width=12, num_steps=4, latents=latents.numpy(), **kw)
    assert_close_rel(got, want, 1e-4, f"Z-Image images, {options}")
    unguided = pipe.generate(PROMPTS, height=16, width=12, num_steps=4, latents=latents.numpy())
    assert np.abs(got - unguided).max() > 1e-2  # the guidance did something


def test_zimage_guidance_inputs(zimage):
    _, pipe = zimage
    with pytest.raises(ValueError, match="2 negative prompts for 3 prompts"):
        pipe.generate(PROMPTS, height=16, width=12, guidance=2.0, negative_prompt=["a", "b"])
    with pytest.raises(ValueError, match="cfg_normalization must be a finite number"):
        pipe.generate(PROMPTS[:1], height=16, width=12, guidance=2.0, cfg_normalization=-1)
    batches = pipe.calibration_batches(PROMPTS[:2], num_steps=3, height=16, width=16,
                                       guidance=2.0)
    assert [b["latents"].shape[0] for b in batches] == [4, 4, 4]  # [prompts; negatives]
    assert batches[0]["cap_feats"].shape[0] == batches[0]["cap_lens"].shape[0] == 4
