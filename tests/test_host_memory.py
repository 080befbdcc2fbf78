"""`pqjax.host_memory.trim`: freed arrays' memory goes back to the operating system."""

from __future__ import annotations

import gc

import jax.numpy as jnp
import pytest

from pqjax.host_memory import _libc, trim


def resident_mib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS"))


def test_trim_returns_freed_arrays_to_the_os():
    if _libc() is None:
        pytest.skip("not glibc: nothing to trim")
    before = resident_mib()
    # each made from a temporary that is freed at once, as a model run frees its intermediates:
    # glibc then serves the later ones from its heap, which it keeps once they are freed
    arrays = [jnp.ones((2_500_000,), jnp.float32) + i for i in range(100)]  # 10 MB each
    keep = [jnp.ones((64,)) + i for i in range(100)]  # small live arrays between them
    arrays[-1].block_until_ready()
    assert resident_mib() - before > 800  # 1 GB allocated
    del arrays
    gc.collect()
    trim()
    assert resident_mib() - before < 300, "freed memory stayed resident"
    assert len(keep) == 100
