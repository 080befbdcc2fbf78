"""QTensor: a quantized tensor as a jax pytree (array leaves + static shape and format)."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
    from pqjax.formats.base import Format

Array = jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class QTensor:
    """Quantized tensor.

    Leaves: codes (packed storage, layout per format), block_scale (one per group, in the scale
    dtype), global_scale (float32 (), nvfp4 only) and zero_point (uint8, asymmetric ints only).
    Static: shape (the original, unpadded shape) and fmt (the Format).
    """

    codes: Array
    block_scale: Array
    global_scale: Array | None
    zero_point: Array | None
    shape: tuple[int, ...]
    fmt: Format

    def dequantize(self, dtype: Any = jnp.float32) -> Array:
        """Dequantized array of self.shape in dtype (computed in float32, then cast)."""
        return self.fmt.dequantize(self, dtype)

    def leaves(self) -> list[Array]:
        """The stored arrays (None leaves left out)."""
        parts = (self.codes, self.block_scale, self.global_scale, self.zero_point)
        return [a for a in parts if a is not None]

    @property
    def nbytes(self) -> int:
        """Bytes of all stored arrays (codes, scales, global scale, zero points)."""
        return sum(int(a.size) * jnp.dtype(a.dtype).itemsize for a in self.leaves())

    @property
    def size(self) -> int:
        """Number of elements of the original tensor."""
        return math.prod(self.shape)

    @property
    def bits_per_element(self) -> float:
        """Storage cost in bits per original element, everything included."""
        return 8.0 * self.nbytes / self.size


jax.tree_util.register_dataclass(
    QTensor,
    data_fields=["codes", "block_scale", "global_scale", "zero_point"],
    meta_fields=["shape", "fmt"],
)
