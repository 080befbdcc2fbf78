"""The roofline model's byte and FLOP counts and its bound (benchmarks/roofline.py)."""

from __future__ import annotations

import pytest

from benchmarks import roofline as rl


def test_nvfp4_bytes_are_codes_plus_e4m3_scales():
    # 4 bits per value + one byte per 16 values: 0.5625 bytes per value
    assert rl.nvfp4_bytes(16, 3072) == 16 * 3072 * 0.5625


def test_matmul_bound_switches_at_the_ridge():
    h100 = rl.GPUS["H100 SXM"]
    # M = 1: the weight read (K N / 2 + K N / 16 bytes) dominates -> memory-bound
    k = rl.matmul_kernels(1, 3072, 3072)["w4a4_nvfp4"]
    p = rl.predict(k, h100)
    assert p["bound"] == "memory" and p["time_s"] == pytest.approx(k["bytes"] / h100["hbm"])
    # M = 4608: 2 M N K FLOPs at the bf16 roof
    k = rl.matmul_kernels(4608, 3072, 3072)["w4a4_nvfp4"]
    p = rl.predict(k, h100)
    assert p["bound"] == "compute"
    assert p["time_s"] == pytest.approx(2 * 4608 * 3072 * 3072 / h100["bf16"])


def test_block_counts_every_linear_of_a_double_block():
    # per stream: modulation, qkv, out, fc1, fc2; two streams
    names = [k["kernel"] for k, _ in rl.block_kernels("double", "bf16")]
    assert names.count("bf16 matmul") == 10 and names.count("attention (bf16)") == 1
    w4 = [k["kernel"] for k, _ in rl.block_kernels("double", "w4a4_nvfp4")]
    # quantize passes: modulation, out projection and fc2 inputs of each stream
    assert w4.count("W4A4 NVFP4") == 10 and w4.count("quantize -> NVFP4") == 6
