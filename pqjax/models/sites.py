"""Permutation sites as data: one channel order shared by every layer that reads the same input.

A `Site` says, in module paths, everything a permutation of its channels touches:
- `consumers`: Linears whose input rows (kernel axis 0) are permuted: they read the site;
- `edits`: parameter slices permuted along an axis: the producing layer's output columns,
  AdaLN modulation chunks, a norm's affine weights, a depthwise conv's channels;
- `norms`: norms that read their input through the permutation (`norm.perm`), so that the
  residual stream itself is never permuted;
- `segments`: which orders are valid (free, or within heads).
Each model family declares its sites with these types in its record (`pqjax.models.family`);
`permute.absorb` applies the edits and `permute.search` finds the order.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pqjax.models.paths import module_at

# ((size, block), ...): consecutive channel ranges; an order may move a channel only within
# its block of `block` channels (block == size: free; block == head_dim: within heads).
Segments = tuple[tuple[int, int], ...]


@dataclasses.dataclass(frozen=True)
class Edit:
    """Permute a slice of a parameter along `axis` with (part of) the site's order.

    param: dotted path of an `nnx.Param` (e.g. `transformer_blocks.0.attn.to_v.kernel`).
    channels: `(start, stop)` range of the site's channels this parameter produces (default:
    all); the slice `offset : offset + stop - start` of `axis` is permuted by
    `perm[start:stop] - start`. index: optional leading index (row k of a `(6, d)` table).
    """

    param: str
    axis: int
    offset: int = 0
    index: int | None = None
    channels: tuple[int, int] | None = None
    # How a per-channel scale s folds in (SmoothQuant-style methods): "linear" divides the
    # slice by s; "mod_scale" is an AdaLN scale chunk used as (1 + scale), so
    # kernel -> kernel / s and bias -> (bias + 1) / s - 1; "perm_only" is permuted but takes
    # no scale (the gate half of a GLU: silu(gate) * value is linear in value only).
    role: str = "linear"


@dataclasses.dataclass(frozen=True)
class Site:
    """A permutation site. `dim` channels; see the module docstring for the fields."""

    name: str
    dim: int
    consumers: tuple[str, ...]
    edits: tuple[Edit, ...] = ()
    norms: tuple[str, ...] = ()
    segments: Segments = ()
    kind: str = "free"  # "norm" | "attn_out" | "ffn_hidden" | "free": for reports
    # A per-channel scale folds offline into the producers (no nonlinearity between producer
    # and consumers); otherwise it is applied online (QuantLinear.input_scale).
    scalable: bool = True
    # The norm's output goes straight into the consumers, with no op between, so the norm
    # kernel may quantize it for them (pqjax.backends.fusion).
    direct: bool = False
    # The consumers read one row per image, not per token (a conditioning vector such as
    # SiLU(temb) before the AdaLN linears): a consumer's error shifts the modulation of every
    # token of the image the same way, so its per-row error need not predict its effect on
    # the images (permuquant_h's choice there: `pqjax.baselines.rotation_choice`).
    per_image: bool = False

    def __post_init__(self):
        if not self.segments:
            object.__setattr__(self, "segments", ((self.dim, self.dim),))
        if sum(s for s, _ in self.segments) != self.dim:
            raise ValueError(f"site {self.name}: segments {self.segments} do not cover {self.dim}")

    def random(self, key: jax.Array) -> np.ndarray:
        """A uniformly random valid permutation `(dim,)` int32."""
        scores = jax.random.uniform(key, (self.dim,))
        return np.asarray(order_within(scores, self.segments))

    def identity(self) -> np.ndarray:
        return np.arange(self.dim, dtype=np.int32)

    def is_valid(self, perm: np.ndarray) -> bool:
        """True iff `perm` is a permutation that moves channels only within allowed blocks."""
        perm = np.asarray(perm)
        if perm.shape != (self.dim,) or sorted(perm.tolist()) != list(range(self.dim)):
            return False
        offset = 0
        for size, block in self.segments:
            idx = np.arange(offset, offset + size)
            if not np.array_equal((perm[idx] - offset) // block, (idx - offset) // block):
                return False
            offset += size
        return True


def linear_out(
    model: nnx.Module,
    path: str,
    offset: int = 0,
    channels: tuple[int, int] | None = None,
    role: str = "linear",
) -> tuple[Edit, ...]:
    """Edits for a Linear's output columns (kernel axis 1, and the bias if it has one)."""
    edits = [Edit(f"{path}.kernel", axis=1, offset=offset, channels=channels, role=role)]
    if module_at(model, path).bias is not None:
        edits.append(Edit(f"{path}.bias", axis=0, offset=offset, channels=channels, role=role))
    return tuple(edits)


def modulation(
    model: nnx.Module, linear: str, dim: int, *, scale: int, shift: int | None = None
) -> tuple[Edit, ...]:
    """Edits for the AdaLN scale chunk (used as 1 + scale) and shift chunk (if any) of an
    AdaLN linear's output; chunk indices count blocks of `dim` columns."""
    edits = linear_out(model, linear, offset=scale * dim, role="mod_scale")
    if shift is not None:
        edits = linear_out(model, linear, offset=shift * dim) + edits
    return edits


def order_within(scores: jax.Array, segments: Segments) -> jax.Array:
    """argsort of scores within each block (no rounding: used for random orders)."""
    parts, offset = [], 0
    for size, block in segments:
        seg = scores[offset : offset + size].reshape(size // block, block)
        base = offset + block * jnp.arange(size // block)[:, None]
        parts.append((jnp.argsort(seg, axis=-1) + base).reshape(-1))
        offset += size
    return jnp.concatenate(parts).astype(jnp.int32)
