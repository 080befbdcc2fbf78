"""Static block configurations of the kernels, chosen per shape by small tables.

Source: reasoning, not yet measurement (no GPU was available when these were written; the
numbers are to be replaced by the sweeps of `benchmarks/kernels_gpu.py` on H100 / H200 /
RTX 5090). The reasoning, for an H100 SXM (132 SMs, 3.35 TB/s, ~50 MB L2):

Norm (`NormConfig`): a row is one register tile of Gp*H float32 values (4096 for d = 3072
with group 16). 8 warps keep that at 16 values per thread; 4 warps suffice up to 1024 values,
16 warps above 4096. `rows` tokens per program amortize the loads of the permutation (4 bytes
per channel, twice the bytes of a bf16 row) and of the affine/modulation vectors, while
B * T / rows programs (576 for FLUX's 4608 tokens at rows = 8) still fill every SM several
times over.

FP4 matmul (`MatmulConfig`), by M (tokens):
* M <= 16 and M <= 64: weight-bound (the activation tile is tiny): block_m = 16 / 64 (the
  smallest tl.dot M is 16), block_n = 64, long block_k = 256 for long contiguous code reads
  (128 bytes per weight row per step), 4 stages to keep loads in flight; split-K raises the
  number of programs to about two per SM when the N tiles alone do not (N = 3072 gives 48).
* M <= 256: 64 x 128 tiles, block_k = 128.
* larger M: compute-bound, 128 x 128 x 128 tiles with 8 warps and 3 stages (the dequantized
  bf16 operands take 2 x 32 KB of shared memory per stage in the worst case).
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


# (max tile elements of a row, tokens per program, warps)
NORM_TABLE: tuple[tuple[int | None, int, int], ...] = (
    (1024, 16, 4),
    (4096, 8, 8),
    (None, 4, 16),
)

# (max M, block_m, block_n, block_k, warps, stages)
MATMUL_TABLE: tuple[tuple[int | None, int, int, int, int, int], ...] = (
    (16, 16, 64, 256, 4, 4),
    (64, 64, 64, 256, 4, 4),
    (256, 64, 128, 128, 4, 3),
    (None, 128, 128, 128, 8, 3),
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
