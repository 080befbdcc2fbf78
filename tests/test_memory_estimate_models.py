"""pqjax.estimate_memory on the SANA and Z-Image presets: the transformers' parameter counts
match the released checkpoints (SANA-1.5 1.6B: 1,604,641,952; Z-Image-Turbo: 6,154,908,736)."""

from __future__ import annotations

import pytest

import pqjax


@pytest.mark.parametrize(
    "name, billions, exact",
    [("sana-1.5-1.6b", 1.60, 1_604_641_952), ("z-image-turbo", 6.15, 6_154_908_736)],
)
def test_transformer_parameter_counts(name, billions, exact):
    est = pqjax.estimate_memory(name, pqjax.QuantConfig(weights="nvfp4", acts="nvfp4"))
    t = est.transformer
    assert round(t["params"] / 1e9, 2) == billions
    assert t["params"] == exact
    assert t["bf16_bytes"] == 2 * exact
    # NVFP4 stores 4.5 bits per quantized weight; embedders and the final projection stay 16-bit
    assert 0 < t["quantized_params"] < t["params"]
    assert 3.0 < t["bf16_bytes"] / t["quantized_bytes"] < 16 / 4.5
    assert f"| transformer | {exact / 1e9:.3f} B |" in est.to_markdown()
