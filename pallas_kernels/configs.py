"""Static block configurations of the kernels, chosen per shape by small tables.

Sources. Each table row says where it comes from: "reasoning" (no GPU has run these kernels
yet; the reasoning is below) or "compiled" (the row was changed after compiling the kernels
for sm_80, sm_90a and sm_120 with no GPU: `benchmarks/compile_kernels.py`, results in
benchmarks/results/kernels_compiled.md; tests/pallas_kernels/test_compiled.py holds every row
to no spills and to each target's shared-memory limit, the widest norm row as a strict
xfail). Timings are still to come from the sweeps of `benchmarks/kernels_gpu.py` on H100 /
H200 / RTX 5090. The reasoning, for an H100 SXM (132 SMs, 3.35 TB/s, ~50 MB L2):

Norm (`NormConfig`): a row is one register tile of Gp*H float32 values (4096 for d = 3072
with group 16). 8 warps keep that at 16 values per thread; 4 warps suffice up to 1024 values,
16 warps above 4096. `rows` tokens per program amortize the loads of the permutation (4 bytes
per channel, twice the bytes of a bf16 row) and of the affine/modulation vectors, while
B * T / rows programs (576 for FLUX's 4608 tokens at rows = 8) still fill every SM several
times over. Compiled: the rows up to 4096 elements run spill-free on the three targets as
reasoned (114-174 registers). Wider rows (d > 4096 at group 16; no model here) spill on every
target at every warp count tried (16 warps: 472-560 bytes; 8: 680-792; 32: 272-320), since the
kernel holds a whole row in registers; the row stays as reasoned until the kernel tiles a row.

FP4 matmul (`MatmulConfig`), by M (tokens). The kernel dequantizes both operands in
registers before each MMA (and Pallas emits dot(a, b, 0) + acc, which Triton 3.9 does not
fold into an accumulating dot), so the register file, not shared memory, bounds
the tile. The first table (reasoned: 16/64 x 64 x 256
with 4 stages, 64 x 128 x 128, 128 x 128 x 128 with 8 warps) used 255 registers per thread and
spilled on every target that issues mma.sync (sm_80 up to 42 KB, sm_120 up to 13 KB of spill
traffic per thread); only Hopper's wgmma tiles at 128 x 128 stayed clean. The rows now:
* M <= 16: weight-bound; block_m = 16 (the smallest tl.dot M), block_n = 64, block_k = 128,
  2 stages (compiled: 256 and 4 stages spilled; NVFP4 111 / 141 / 146 registers, no spills);
  split-K raises the number of programs to about two per SM when the N tiles alone do not.
* M <= 64 and M <= 256: 64 x 64 x 64 tiles, 4 warps, 3 stages (compiled: block_k = 128 or
  block_n = 128 spilled on sm_80 / sm_120; NVFP4 141-188 registers, no spills).
* larger M: compute-bound; 128 x 64 x 64 tiles, 8 warps, 2 stages (compiled: NVFP4 184 / 128
  / 187 registers on sm_80 / sm_90a / sm_120, no spills; 128 x 128 x 64 spilled on sm_80 and
  sm_120).
"""

from __future__ import annotations

import dataclasses

SM_COUNT = 132  # H100 SXM; only used to size split-K


def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


@dataclasses.dataclass(frozen=True)
class NormConfig:
    """Tokens per program and warps of the fused norm."""

    rows: int = 8
    num_warps: int = 8


@dataclasses.dataclass(frozen=True)
class MatmulConfig:
    """Tile sizes (block_k in elements, even), split-K factor, warps and pipeline stages."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"MatmulConfig.{name} must be a power of two >= 16, got {v}")
        if self.block_k < 32 or self.block_k & (self.block_k - 1):
            raise ValueError(
                f"MatmulConfig.block_k must be a power of two >= 32, got {self.block_k}"
            )
        if self.split_k < 1:
            raise ValueError(f"MatmulConfig.split_k must be >= 1, got {self.split_k}")


# (max tile elements of a row, tokens per program, warps); every row: reasoning (above);
# compiled for sm_80 / sm_90a / sm_120 (kernels_compiled.md): the first two spill-free,
# the last spills ~0.5 KB on each (a kernel limit: no warp count avoids it)
NORM_TABLE: tuple[tuple[int | None, int, int], ...] = (
    (1024, 16, 4),
    (4096, 8, 8),
    (None, 4, 16),
)

# (max M, block_m, block_n, block_k, warps, stages); source of each row in its comment
MATMUL_TABLE: tuple[tuple[int | None, int, int, int, int, int], ...] = (
    # reasoning (weight-bound, smallest block_m) + compiled: block_k 256 -> 128, 4 -> 2 stages
    (16, 16, 64, 128, 4, 2),
    # compiled: was 64 x 64 x 256 (255 registers, spills on all three targets)
    (64, 64, 64, 64, 4, 3),
    # compiled: was 64 x 128 x 128 (spilled 4.2 KB on sm_80, 5.4 KB on sm_120)
    (256, 64, 64, 64, 4, 3),
    # compiled: was 128 x 128 x 128, 3 stages (spilled up to 42 KB on sm_80); 128 x 64 x 64
    # with 2 stages is the largest tile found spill-free on all three (Hopper's wgmma alone
    # also ran 128 x 128 x 64 clean: a per-target table could give it the larger tile)
    (None, 128, 64, 64, 8, 2),
)


def norm_config(d: int, tokens: int, group: int = 16) -> NormConfig:
    """Table lookup by the row tile size; rows capped by the token count."""
    elems = _pow2(-(-d // group)) * _pow2(group)
    for max_elems, rows, warps in NORM_TABLE:
        if max_elems is None or elems <= max_elems:
            return NormConfig(rows=max(1, min(rows, tokens)), num_warps=warps)
    raise AssertionError("unreachable")


def matmul_config(m: int, n: int, k: int, *, sm_count: int = SM_COUNT) -> MatmulConfig:
    """Table lookup by M; tiles shrink to the problem (powers of two, >= the tl.dot minima)."""
    row = next(r for r in MATMUL_TABLE if r[0] is None or m <= r[0])
    _, bm, bn, bk, warps, stages = row
    bm = max(16, min(bm, _pow2(m)))
    bn = max(16, min(bn, _pow2(n)))
    bk = max(32, min(bk, _pow2(k)))
    tiles = -(-m // bm) * -(-n // bn)
    k_steps = -(-k // bk)
    split = 1
    # split K until about two programs per SM, keeping >= 4 K steps per split
    while tiles * split < 2 * sm_count and k_steps // (2 * split) >= 4:
        split *= 2
    return MatmulConfig(bm, bn, bk, split, warps, stages)
