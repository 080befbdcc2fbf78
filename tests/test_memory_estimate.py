"""pqjax.estimate_memory against the known full-size figures (abstract models, no weights)."""

from __future__ import annotations

import pytest

import pqjax
from pqjax.memory import estimate_memory, quantized_weight_bytes

GiB = 2**30


@pytest.fixture(scope="module")
def flux_dev():
    return estimate_memory("flux-dev", pqjax.QuantConfig(weights="nvfp4", acts="nvfp4"))


def test_flux_dev_transformer_figures(flux_dev):
    t = flux_dev.transformer
    assert round(t["params"] / 1e9, 2) == 11.90
    assert round(t["bf16_bytes"] / GiB, 2) == 22.17
    assert 6.2 < t["quantized_bytes"] / GiB < 6.4  # "near 6.3 GiB"
    assert 3.4 < t["bf16_bytes"] / t["quantized_bytes"] < 3.6  # "3.5x"
    assert round(flux_dev.components["text_encoder_2"]["params"] / 1e9, 2) == 4.76


def test_quantized_bytes_follow_the_format():
    from pqjax import formats

    assert quantized_weight_bytes(3072, 3072, formats.get("nvfp4")) == 3072 * 3072 * 9 // 16 + 4
    assert quantized_weight_bytes(64, 128, formats.get("int4", group=64)) == 64 * 64 + 64 * 2 * 2


def test_peaks_fit_a_24_gb_gpu(flux_dev):
    peaks = flux_dev.peaks
    assert peaks["block-by-block quantization (engine, streamed)"] < 24
    assert peaks["inference (quantized transformer + VAE, encoders released)"] < 24
    assert peaks["inference (bf16 transformer + VAE, encoders released)"] > 22


def test_unknown_name():
    with pytest.raises(ValueError, match="flux-dev"):
        estimate_memory("flux-pro")


@pytest.mark.parametrize(
    "name, kwargs",
    [("nvfp4", {}), ("mxfp4", {}), ("int4", {}), ("int4", {"group": 32}), ("int2", {"group": 64}),
     ("int3_asym", {"group": "channel"}), ("int8", {}), ("int8_asym", {"group": 128})],
)
def test_layout_bytes_equal_the_formats_own_quantize(name, kwargs):
    from pqjax import formats
    from pqjax.memory import abstract_weight_bytes, layout_bytes

    fmt = formats.get(name, **kwargs)
    for d_out, d_in in [(3, 100), (5, 64), (2, 3072), (1, 5600)]:
        assert layout_bytes(d_out, d_in, fmt) == abstract_weight_bytes(d_out, d_in, fmt), (
            fmt, d_out, d_in
        )


def test_formats_without_a_layout_fall_back_to_abstract_evaluation():
    from pqjax import formats
    from pqjax.memory import abstract_weight_bytes, layout_bytes

    fmt = formats.get("fp8")
    assert layout_bytes(4, 64, fmt) is None
    assert quantized_weight_bytes(4, 64, fmt) == abstract_weight_bytes(4, 64, fmt) >= 4 * 64


def test_family_token_counts_and_widths():
    """SANA at 1024 px: DC-AE 32x gives 32x32 = 1024 image tokens, Mix-FFN 2.5 d (its GLU conv
    2 x 2.5 d wide); FLUX and Z-Image: VAE 8x and 2x2 patches give 64x64 = 4096."""
    sana = estimate_memory("sana-1.5-1.6b")
    assert "(1024 image + 300 text tokens)" in sana.assumptions["resolution"]
    assert "Mix-FFN 2.5d" in sana.assumptions["family"]
    # the whole pipeline: Gemma-2-2B (2.61 B) and the DC-AE decoder (0.16 B) are counted
    assert "not counted" not in sana.assumptions
    assert sana.components["text_encoder"]["params"] == 2_614_341_888
    assert sana.peaks["prompt encoding (text encoders, bf16)"] * 2**30 == 2 * 2_614_341_888
    zimage = estimate_memory("z-image-turbo")
    assert zimage.components["text_encoder"]["params"] == 4_022_468_096  # Qwen3-4B, no head
    assert zimage.components["vae"]["params"] == 83_819_683  # the FLUX.1 VAE
    for name, txt in [("flux-dev", 512), ("flux-schnell", 256), ("z-image-turbo", 512)]:
        est = estimate_memory(name, height=512, width=768)
        assert f"(1536 image + {txt} text tokens)" in est.assumptions["resolution"]
    assert "not counted" not in estimate_memory("flux-dev").assumptions


def test_peaks_grow_with_resolution_and_in_memory_exceeds_streamed(flux_dev):
    big = estimate_memory("flux-dev", pqjax.QuantConfig(weights="nvfp4", acts="nvfp4"),
                          height=2048, width=2048, flash_attention=False)
    for key, value in flux_dev.peaks.items():
        if "prompt encoding" not in key:
            assert big.peaks[key] > value, key
    peaks = flux_dev.peaks
    assert (peaks["in-memory quantization (bf16 transformer + its quantized copy)"]
            > peaks["block-by-block quantization (engine, streamed)"])
