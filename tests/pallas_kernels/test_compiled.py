"""Every block config of the kernels' tables compiles to a cubin for sm_80, sm_90a and sm_120.

No GPU: Pallas lowers each kernel to TTIR on CPU and the PyPI `triton` package compiles it
with its bundled ptxas (benchmarks/triton_compile.py). For each table row (the norm writing
NVFP4; the NVFP4 W4A4 matmul; the MXFP4 matmul's FP8 path on the targets with FP8 MMAs) and
target: it compiles, ptxas reports no spill bytes, and the shared memory fits the target's
per-block limit. Compiles are memoized on disk ($PQJAX_CUBIN_CACHE, else ~/.cache/pqjax-cubins,
keyed by the TTIR, options, target and triton version), so a warm run takes seconds.
"""

from __future__ import annotations

import functools

import pytest

triton = pytest.importorskip(
    "triton", reason="the triton compiler package is missing: pip install -c constraints.txt triton"
)

from benchmarks import compile_kernels as ck  # noqa: E402
from benchmarks.triton_compile import TARGETS, occupancy  # noqa: E402

VARIANTS = [*ck.norm_variants(table_only=True), *ck.matmul_variants(table_only=True)]
# Norm rows past a 4096-element tile spilled at every warp count; they are not in the table
# (the dispatcher gives them to XLA: tests/backends/test_dispatch.py).


def _case(v, target):
    return pytest.param(VARIANTS.index(v), target, id=f"{v.kernel}-row{v.table_row}-{target}")


CASES = [_case(v, t) for v in VARIANTS for t in ck.targets_for(v)]


@functools.cache
def _kernel(i: int):
    return VARIANTS[i].lower()


@functools.cache
def _compiled(i: int, target: str) -> dict:
    return ck.compile_cached(_kernel(i), target)


@pytest.mark.slow
@pytest.mark.parametrize("i,target", CASES)
def test_table_config_compiles(i, target):
    res = _compiled(i, target)
    assert res["compiled"], res.get("error")
    assert res["ptx_target"].startswith(target.rstrip("a"))
    assert res["spills"] == 0, f"{VARIANTS[i].config} spills {res['spills']} bytes on {target}"
    assert res["shared_bytes"] <= TARGETS[target]["smem_block"]
    assert res["registers"] <= 255
    if VARIANTS[i].kernel == "matmul/mxfp4_fp8" and target == "sm_120":
        assert res["instructions"]["fp8_mma"]  # mma.sync ... e4m3 on consumer Blackwell


def test_every_table_row_is_covered():
    """The shapes compiled above select each table row in turn (the table is all compiled)."""
    from pallas_kernels import configs

    assert len(ck.NORM_TABLE_D) == len(configs.NORM_TABLE)
    for d, (_, rows, warps) in zip(ck.NORM_TABLE_D, configs.NORM_TABLE, strict=True):
        cfg = configs.norm_config(d, ck.TOKENS, 16)
        assert (cfg.rows, cfg.num_warps) == (rows, warps)
    assert len(ck.MATMUL_TABLE_M) == len(configs.MATMUL_TABLE)
    for m, row in zip(ck.MATMUL_TABLE_M, configs.MATMUL_TABLE, strict=True):
        c = configs.matmul_config(m, ck.N, ck.K)
        assert (c.block_m, c.block_n, c.block_k, c.num_warps, c.num_stages) == row[1:]


def test_occupancy_arithmetic():
    # 8 warps, 128 regs -> 128*32 = 4096 regs/warp, 32 K per block: 2 blocks by registers;
    # 16 warps resident of 64 on sm_90a = 25 %
    occ = occupancy("sm_90a", 128, 0, 8)
    assert occ["blocks_per_sm"] == 2 and occ["occupancy"] == 0.25
    assert occ["occupancy_limit"] == "registers"
    # sm_120: 100 KB per SM, 48 KB + 1 KB reserved per block -> 2 blocks; 48 warps resident max
    occ = occupancy("sm_120", 32, 48 * 1024, 4)
    assert occ["blocks_per_sm"] == 2 and occ["occupancy_limit"] == "shared"
    assert occ["occupancy"] == round(8 / 48, 4)
