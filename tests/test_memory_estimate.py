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
    assert peaks["block-wise quantization (device)"] < 24
    assert peaks["inference (quantized transformer + VAE, encoders released)"] < 24
    assert peaks["inference (bf16 transformer + VAE, encoders released)"] > 22


def test_unknown_name():
    with pytest.raises(ValueError, match="flux-dev"):
        estimate_memory("flux-pro")
