"""Give freed host memory back to the operating system (a leaf module).

    trim()      # after releasing gigabytes of arrays, before loading the next big thing

glibc keeps freed heap memory for reuse: 5 GB of 20 MB jax arrays, freed, left 2.1 GB resident
until `malloc_trim` returned it (0.2 GB after). A full-size run frees tens of gigabytes (text
encoders after the prompts' encoding, the model stage's full-precision layers), so under a
memory budget pqjax trims before it loads the next large part. Elsewhere than glibc, nothing.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any


@functools.cache
def _libc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def trim() -> None:
    """Return the heap's free memory to the OS (glibc's `malloc_trim(0)`; else a no-op)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
