"""Dense little-endian bit packing: layout vs the numpy reference, round trips, sign extension."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from pqjax import formats
from tests.formats import numpy_reference as ref
from tests.formats.helpers import assert_same_bits


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_matches_reference_and_round_trips(bits):
    rng = np.random.default_rng(bits)
    sizes = (1, 7, 8, 13, 64)
    all_codes = [rng.integers(0, 2**bits, size=(3, n)).astype(np.uint8) for n in sizes]

    @jax.jit
    def pack_unpack(cs):  # one compilation for all sizes
        packed = [formats.pack_bits(c, bits) for c in cs]
        return packed, [formats.unpack_bits(p, bits, c.shape[-1]) for p, c in zip(packed, cs)]

    for codes, packed, back in zip(all_codes, *pack_unpack(all_codes)):
        n = codes.shape[-1]
        assert packed.shape == (3, formats.packed_len(n, bits)) == (3, -(-n * bits // 8))
        assert_same_bits(packed, ref.pack(codes, bits), f"pack {bits} bits n={n}")
        assert_same_bits(back, codes, f"unpack {bits} bits n={n}")
        assert_same_bits(ref.unpack(np.asarray(packed), bits, n), codes, "reference unpack")


def test_known_layouts():
    # FP4 / INT4: element 0 in the low nibble
    assert np.asarray(formats.pack_bits(np.array([0x1, 0xA], np.uint8), 4)).tolist() == [0xA1]
    # INT3: 8 values per 3 bytes; element i at bits [3i, 3i + 3)
    codes = np.array([1, 2, 3, 4, 5, 6, 7, 0], np.uint8)
    stream = sum(int(c) << (3 * i) for i, c in enumerate(codes))
    want = [(stream >> (8 * j)) & 0xFF for j in range(3)]
    assert np.asarray(formats.pack_bits(codes, 3)).tolist() == want
    # INT2: four per byte
    assert np.asarray(formats.pack_bits(np.array([3, 0, 1, 2], np.uint8), 2)).tolist() == [
        0b10_01_00_11
    ]


@pytest.mark.parametrize("bits", range(2, 9))
def test_two_complement_codes_round_trip(bits):
    q = np.arange(-(2 ** (bits - 1)), 2 ** (bits - 1), dtype=np.int8)[None, :]
    f = jax.jit(
        lambda q: formats.sign_extend(
            formats.unpack_bits(formats.pack_bits(q, bits), bits, q.shape[-1]), bits
        )
    )
    back = f(q)
    assert_same_bits(back, q, f"signed {bits}")
