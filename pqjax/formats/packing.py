"""Dense little-endian bit packing of b-bit codes (b = 1..8) along the last axis.

Element i of a row occupies bits [i*b, (i+1)*b) of the row's byte string, bit 0 being the least
significant bit of byte 0. So for b = 4 element 0 is the low nibble of byte 0, and b = 3 packs
8 values into 3 bytes. A row of n codes takes ceil(n*b/8) bytes; unused high bits are zero.
All loops are over static Python ints (at most 8x8), so the functions also work inside kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array


def packed_len(n: int, bits: int) -> int:
    """Bytes needed for n codes of `bits` bits: ceil(n*bits/8)."""
    return -(-n * bits // 8)


def _check_bits(bits: int) -> None:
    if not (isinstance(bits, int) and 1 <= bits <= 8):
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")


def _as_u32(codes: Array) -> Array:
    """Integer codes -> uint32, keeping the low 8 bits' two's-complement pattern."""
    codes = jnp.asarray(codes)
    if codes.dtype == jnp.int8:
        codes = lax.bitcast_convert_type(codes, jnp.uint8)
    return codes.astype(jnp.uint32)


def pack_bits(codes: Array, bits: int) -> Array:
    """Pack integer codes (..., n) (low `bits` bits of each; int8 as two's complement).

    Returns uint8 (..., ceil(n*bits/8)).
    """
    _check_bits(bits)
    c = _as_u32(codes) & np.uint32((1 << bits) - 1)
    n = c.shape[-1]
    if bits == 8:
        return c.astype(jnp.uint8)
    n8 = -(-n // 8) * 8
    if n8 != n:
        c = jnp.pad(c, [(0, 0)] * (c.ndim - 1) + [(0, n8 - n)])
    # 8 codes of b bits make exactly b bytes
    c = c.reshape(*c.shape[:-1], n8 // 8, 8)
    out = []
    for j in range(bits):
        acc = None
        for i in range(8):
            lo = i * bits
            if lo + bits <= 8 * j or lo >= 8 * j + 8:
                continue  # element i does not touch byte j
            shift = lo - 8 * j
            term = c[..., i] << shift if shift >= 0 else c[..., i] >> -shift
            acc = term if acc is None else acc | term
        out.append((acc & np.uint32(0xFF)).astype(jnp.uint8))
    packed = jnp.stack(out, axis=-1).reshape(*c.shape[:-2], (n8 // 8) * bits)
    return packed[..., : packed_len(n, bits)]


def unpack_bits(packed: Array, bits: int, n: int) -> Array:
    """Inverse of :func:`pack_bits`: uint8 (..., ceil(n*bits/8)) -> uint8 codes (..., n)."""
    _check_bits(bits)
    p = jnp.asarray(packed)
    if bits == 8:
        p = lax.bitcast_convert_type(p, jnp.uint8) if p.dtype == jnp.int8 else p
        return p[..., :n]
    n8 = -(-n // 8) * 8
    full = (n8 // 8) * bits
    if p.shape[-1] != full:
        p = jnp.pad(p, [(0, 0)] * (p.ndim - 1) + [(0, full - p.shape[-1])])
    p = p.astype(jnp.uint32).reshape(*p.shape[:-1], n8 // 8, bits)
    mask = np.uint32((1 << bits) - 1)
    out = []
    for i in range(8):
        j0, off = divmod(i * bits, 8)
        v = p[..., j0] >> off
        if off + bits > 8:  # the code straddles two bytes
            v = v | (p[..., j0 + 1] << (8 - off))
        out.append((v & mask).astype(jnp.uint8))
    codes = jnp.stack(out, axis=-1).reshape(*p.shape[:-2], n8)
    return codes[..., :n]


def sign_extend(u: Array, bits: int) -> Array:
    """b-bit two's-complement patterns in uint8 (...) -> int8 (...)."""
    _check_bits(bits)
    half = 1 << (bits - 1)
    v = jnp.asarray(u).astype(jnp.int32) & ((1 << bits) - 1)
    return ((v ^ half) - half).astype(jnp.int8)
