"""Orthogonal block-Hadamard rotations of a Linear's input channels (QuaRot / ConvRot style).

    y = apply_input_transform("hadamard:16", x)      # x (..., d) -> x T   (online, per token)
    k = fold_into_kernel("hadamard:16", kernel)      # (d, d_out) -> T^T kernel   (offline)
    # (x T)(T^T W) = x W: exact in full precision; the quantizers then see rotated values.

T is block diagonal: one orthonormal b x b Hadamard block per run of b consecutive channels
(b = the quantization group, so a rotation never mixes two groups). A name fully determines T
for a given d (checkpoints store only the name):

  "hadamard:<b>"          Sylvester H_b / sqrt(b), b = 2^k (H_2n = [[H_n, H_n], [H_n, -H_n]]),
                          applied by the fast Walsh-Hadamard transform: k butterfly stages.
  "regular_hadamard:<b>"  regular R_b / sqrt(b), b = 4^k: R_4 = J - 2I (every row sums to 2),
                          R_4^k = R_4 (x) ... (x) R_4 (Kronecker products of regular Hadamard
                          matrices are regular; row sums multiply to 2^k = sqrt(b)). R_4 is
                          Sylvester H_4 with its first column and last three rows negated, rows
                          reordered. Applied as k stages of y = sum(y) - 2 y over base-4 digits.
  ":seed<s>" suffix       random signs first: T = D B with D = diag(+-1) over all d channels,
                          drawn by numpy's PCG64 seeded with s (stable across platforms).

Why "regular" (ConvRot): Sylvester's first column is all ones, so a Sylvester block maps the
all-ones direction onto a single coordinate. A channel offset shared by a group (post-GELU or
post-SiLU inputs have a positive mean in every channel) then becomes an outlier COLUMN, sqrt(b)
times the offset, at position 0 of every block, for every token. A regular matrix has constant
column sums, so it maps the all-ones vector to the all-ones vector: the offset stays spread
evenly over the block and no column outlier is created. Regular Hadamard matrices exist only
for b = 4m^2, hence the power-of-four blocks.

Tail: when b does not divide d, the last d % b channels are left unrotated (T is the identity
there); `rotated_dims` says how many channels are rotated. Sylvester and regular blocks (with or
without signs D) are symmetric, so T^T = T^-1 = D B.

Many transforms, one program: `transform_table(names, d)` holds names as arrays, and
`apply_selected(row, x, max_block)` applies the row it is given, possibly a traced one.
`permute.search` scores all its rotation candidates with one compiled body that way: one body
per candidate made its first call 4x slower (measured on 2 CPU cores, nine candidates at
d = 256: 9.4 s against 2.4 s, nearly all compilation). The loop of gathers runs slower than the
unrolled stages: 0.79 s against 0.45 s per call there, 3.0 s against 2.7 s at d = 3072, where
the matmuls dominate.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("hadamard", "regular_hadamard")
_NAME = re.compile(r"^(?P<kind>[a-z_]+):(?P<block>\d+)(?::seed(?P<seed>\d+))?$")


@dataclasses.dataclass(frozen=True)
class TransformSpec:
    """A parsed transform name: kind (one of KINDS), block size, optional sign seed."""

    kind: str
    block: int
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown input transform kind {self.kind!r}; choose one of {KINDS}")
        b = self.block
        if b < 1 or b & (b - 1):
            raise ValueError(f"{self.kind}: block must be a power of two, got {b}")
        if self.kind == "regular_hadamard" and (b.bit_length() - 1) % 2:
            raise ValueError(
                f"regular_hadamard: block must be a power of four (regular Hadamard matrices "
                f"exist only for orders 4m^2), got {b}"
            )

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.block}" + ("" if self.seed is None else f":seed{self.seed}")


@functools.cache
def parse_transform(name: str) -> TransformSpec:
    """'hadamard:16', 'regular_hadamard:64:seed3' -> TransformSpec; malformed names raise."""
    m = _NAME.match(name)
    if m is None:
        raise ValueError(
            f"malformed input transform {name!r}; expected '<kind>:<block>[:seed<s>]' with kind "
            f"in {KINDS}, e.g. 'hadamard:16'"
        )
    seed = m.group("seed")
    return TransformSpec(
        m.group("kind"), int(m.group("block")), None if seed is None else int(seed)
    )


def transform_name(kind: str, block: int, seed: int | None = None) -> str:
    """The canonical name of a transform (validated)."""
    return TransformSpec(kind, block, seed).name


def rotated_dims(d: int, block: int) -> int:
    """How many leading channels of d are rotated: whole blocks only, the tail stays as is."""
    return (d // block) * block


# ----------------------------------------------------------------------------- transforms
# Jitted, so that an eager call (a plan's calibration rows, a test) compiles one program per
# shape instead of one per butterfly operation; under a trace they are inlined.


@jax.jit
def fwht(x: jax.Array) -> jax.Array:
    """Fast Walsh-Hadamard transform along the last axis: x (..., n) -> x H_n / sqrt(n).

    n a power of two; H_n the Sylvester matrix (scipy.linalg.hadamard order); float32 math,
    n log2 n additions, one scaling at the end (exact for n = 4^k).
    """
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"fwht: last axis must be a power of two, got {n}")
    lead = x.shape[:-1]
    y = x.astype(jnp.float32)
    h = 1
    while h < n:
        # pairs (j, j + h) inside each run of 2h: (a, c) -> (a + c, a - c)
        z = y.reshape(*lead, n // (2 * h), 2, h)
        a, c = z[..., 0, :], z[..., 1, :]
        y = jnp.stack([a + c, a - c], axis=-2).reshape(*lead, n)
        h *= 2
    return y * np.float32(1.0 / np.sqrt(n))


@jax.jit
def regular_wht(x: jax.Array) -> jax.Array:
    """x (..., n) -> x R_n / sqrt(n) for the regular Hadamard R_n = R_4^(x k), n = 4^k.

    Each base-4 digit of the channel index is one R_4 = J - 2I stage: y -> sum(y) - 2 y over
    that digit's axis; R_4 / 2 is orthonormal, so the scaling is 2^-k (exact).
    """
    n = x.shape[-1]
    k = (n.bit_length() - 1) // 2
    if 4**k != n:
        raise ValueError(f"regular_wht: last axis must be a power of four, got {n}")
    lead = x.shape[:-1]
    y = x.astype(jnp.float32).reshape(*lead, *([4] * k))
    for ax in range(len(lead), len(lead) + k):
        y = (jnp.sum(y, axis=ax, keepdims=True) - 2 * y) * np.float32(0.5)
    return y.reshape(*lead, n)


_BLOCK_FN = {"hadamard": fwht, "regular_hadamard": regular_wht}


@functools.cache
def _signs(seed: int, d: int) -> np.ndarray:
    """(d,) float32 of +-1 from PCG64(seed): the random diagonal D of a seeded transform."""
    bits = np.random.Generator(np.random.PCG64(seed)).integers(0, 2, size=d)
    return (1 - 2 * bits).astype(np.float32)


@functools.partial(jax.jit, static_argnums=0)
def apply_input_transform(name: str, x: jax.Array) -> jax.Array:
    """x (..., d) -> x T for the transform `name` (see the module docstring), in x's dtype."""
    spec = parse_transform(name)
    d, b = x.shape[-1], spec.block
    y = x.astype(jnp.float32)
    if spec.seed is not None:
        y = y * _signs(spec.seed, d)
    m = rotated_dims(d, b)
    if m == 0:
        return y.astype(x.dtype)
    head = y[..., :m].reshape(*y.shape[:-1], m // b, b)
    head = _BLOCK_FN[spec.kind](head).reshape(*y.shape[:-1], m)
    out = head if m == d else jnp.concatenate([head, y[..., m:]], axis=-1)
    return out.astype(x.dtype)


def fold_into_kernel(name: str, kernel: jax.Array) -> jax.Array:
    """(d_in, d_out) kernel W -> T^T W (float32), so that (x T) (T^T W) = x W.

    Row o of (T^T W)^T = W^T is w_o T: the same transform applied to each output's weights.
    """
    return _fold(parse_transform(name).name, jnp.asarray(kernel, jnp.float32))


@functools.partial(jax.jit, static_argnames="name")
def _fold(name: str, kernel: jax.Array) -> jax.Array:
    # one compilation per (name, shape) instead of one per butterfly op when called eagerly
    return apply_input_transform(name, kernel.T).T


def transform_matrix(name: str, d: int) -> np.ndarray:
    """The explicit (d, d) float64 matrix T of `name` (tests and inspection; O(d^2))."""
    return np.asarray(apply_input_transform(name, jnp.eye(d, dtype=jnp.float32)), np.float64)


def regular_hadamard_matrix(n: int) -> np.ndarray:
    """The unnormalised regular Hadamard R_n = R_4^(x k) (int64 +-1 entries), n = 4^k."""
    r4 = np.ones((4, 4), np.int64) - 2 * np.eye(4, dtype=np.int64)
    out = np.ones((1, 1), np.int64)
    while out.shape[0] < n:
        out = np.kron(out, r4)
    if out.shape[0] != n:
        raise ValueError(f"regular Hadamard matrices here have power-of-four order, got {n}")
    return out


# ------------------------------------------------------------------------- block choice


def largest_block(n: int, kind: str) -> int:
    """Largest power of two (kind 'hadamard') or four ('regular_hadamard') dividing n >= 1."""
    b = n & -n  # lowest set bit: the largest power of two dividing n
    if kind == "regular_hadamard" and (b.bit_length() - 1) % 2:
        b //= 2
    return b


def block_for(group: int | None, d_in: int, kind: str, override: int | None = None) -> int:
    """Rotation block for a layer: `override` if given, else the largest valid block dividing
    the quantization group (the group itself for powers of two / four), else (group None: one
    group over the whole row) the largest valid block dividing d_in."""
    if override is not None:
        return TransformSpec(kind, int(override)).block
    return largest_block(group if group else d_in, kind)


def candidates(
    group: int | None, d: int, kinds: tuple[str, ...] = KINDS, max_block: int | None = None,
    seed: int | None = None,
) -> tuple[str | None, ...]:
    """Rotation candidates of a d-channel input for `permute.search(rotate=...)`: None (no
    rotation) first, then per kind every legal block b with group <= b <= min(d, max_block)
    that divides d (no unrotated tail), smallest first; seed: each with those random signs.

    group None (one group per row): the blocks from 16 up. A block larger than the group mixes
    several groups; `QuantLinear` applies every block online (XLA butterflies before the
    activation quantizer, `pqjax.backends.dispatch` likewise), so all are deployable.
    """
    if d < 1:
        raise ValueError(f"rotate.candidates: d must be >= 1, got {d}")
    low = group if group else 16
    high = min(d, max_block) if max_block else d
    out: list[str | None] = [None]
    for kind in kinds:
        b = 1
        while b <= high:
            legal = kind != "regular_hadamard" or (b.bit_length() - 1) % 2 == 0
            if legal and b >= low and d % b == 0:
                out.append(transform_name(kind, b, seed))
            b *= 2
    return tuple(out)


# ------------------------------------------------------- one program for many transforms

_NONE, _SYLVESTER, _REGULAR = 0, 1, 2


def transform_table(names: tuple[str | None, ...], d: int) -> tuple[dict[str, np.ndarray], int]:
    """The transforms `names` (None: identity) of a d-channel input as stacked arrays, for
    `apply_selected`: one program applies whichever row it is given, so a search over n
    rotations compiles one body instead of n.

    Returns (table, max_block): table["kind"] (n,) int32 (0 none, 1 Sylvester, 2 regular),
    ["block"] (n,) int32, ["rotated"] (n,) int32 (`rotated_dims`), ["scale"] (n,) float32
    (Sylvester's 1/sqrt(b), else 1), ["signs"] (n, d) float32 (ones without a seed); max_block
    the widest block (1 when every entry is None): `apply_selected` pads d to whole blocks of
    it, so that every row's blocks tile the padded width.
    """
    kind, block, rotated, scale, signs = [], [], [], [], []
    for name in names:
        spec = None if name is None else parse_transform(name)
        b = 1 if spec is None else spec.block
        kind.append(_NONE if spec is None else _SYLVESTER if spec.kind == "hadamard" else _REGULAR)
        block.append(b)
        rotated.append(0 if spec is None else rotated_dims(d, b))
        scale.append(np.float32(1.0 / np.sqrt(b)) if kind[-1] == _SYLVESTER else np.float32(1))
        seed = None if spec is None else spec.seed
        signs.append(np.ones(d, np.float32) if seed is None else _signs(seed, d))
    table = {
        "kind": np.asarray(kind, np.int32), "block": np.asarray(block, np.int32),
        "rotated": np.asarray(rotated, np.int32), "scale": np.asarray(scale, np.float32),
        "signs": np.stack(signs),
    }
    return table, max(block)


def apply_selected(row: dict[str, jax.Array], x: jax.Array, max_block: int) -> jax.Array:
    """x (..., d) -> x T for the transform in `row` (one row of `transform_table`, possibly
    traced), float32; equal to `apply_input_transform` of that name up to the order of the
    regular stages' 4-term sums (Sylvester blocks: bit for bit).

    Each butterfly stage pairs channel j with j XOR h (Sylvester, h = 1, 2, ..., b/2) or sums
    the four channels that differ from j in one base-4 digit (regular, highest digit first),
    the stages run in a loop whose length is the row's (log2 b or log4 b stages), so one
    compiled body serves every block size up to max_block. Channels past the rotated whole
    blocks (all of them for None) pass through.
    """
    d = x.shape[-1]
    lead = x.shape[:-1]
    y = x.astype(jnp.float32) * row["signs"]
    plain = y
    width = -(-d // max_block) * max_block  # whole max-blocks; the padding is never kept
    if width != d:
        y = jnp.concatenate([y, jnp.zeros((*lead, width - d), jnp.float32)], axis=-1)
    idx = jnp.arange(width, dtype=jnp.int32)
    kind, block = row["kind"], row["block"]
    log2b = jnp.int32(31) - jax.lax.clz(block.astype(jnp.int32))

    def sylvester(s, y):
        h = jnp.left_shift(jnp.int32(1), s)
        partner = jnp.take(y, idx ^ h, axis=-1)
        return jnp.where((idx & h) == 0, y + partner, partner - y)

    def regular(s, y):
        q = jnp.left_shift(jnp.int32(1), 2 * (log2b // 2 - 1 - s))  # highest digit first
        base = idx - ((idx // q) % 4) * q
        total = jnp.take(y, base, axis=-1)
        for k in (1, 2, 3):
            total = total + jnp.take(y, base + k * q, axis=-1)
        return (total - 2 * y) * np.float32(0.5)

    y = jax.lax.fori_loop(0, jnp.where(kind == _SYLVESTER, log2b, 0), sylvester, y)
    y = y * row["scale"]
    y = jax.lax.fori_loop(0, jnp.where(kind == _REGULAR, log2b // 2, 0), regular, y)
    keep = jnp.arange(d) < row["rotated"]
    return jnp.where(keep, y[..., :d], plain)
