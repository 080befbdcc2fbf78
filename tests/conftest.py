"""Test-wide settings: float32 matmuls at full precision, so parity bounds mean what they say;
a persistent compilation cache for the test run.

Under pytest-xdist (`make test` runs 2 processes) a GPU is shared, so no process preallocates
most of its memory.

The compilation cache (`.cache/jax-tests` in the repository, git-ignored; PQJAX_TEST_JAX_CACHE
moves it, an empty value turns it off) keeps every program that took over 0.1 s to compile:
tests that rebuild the same program (a new jit wrapper, a restored model, a CLI or
multi-device subprocess, the other xdist process) load it instead of compiling it again, and
a second run compiles almost nothing. It is set through JAX's environment variables, so the
subprocesses that tests start use it too. A size limit turns on JAX's file lock around every
cache read and write, so the two xdist processes never read an entry the other is still
writing.
"""

import os
import sys
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

_CACHE_ENV = {
    "JAX_COMPILATION_CACHE_DIR": os.environ.get(
        "PQJAX_TEST_JAX_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "jax-tests")
    ),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.1",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    "JAX_COMPILATION_CACHE_MAX_SIZE": str(4 << 30),  # 4 GiB, least recently used evicted
}
_jax_was_imported = "jax" in sys.modules
if _CACHE_ENV["JAX_COMPILATION_CACHE_DIR"]:
    for _name, _value in _CACHE_ENV.items():
        os.environ.setdefault(_name, _value)

import jax  # noqa: E402

if _jax_was_imported and _CACHE_ENV["JAX_COMPILATION_CACHE_DIR"]:  # env read at import: too late
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update(
        "jax_persistent_cache_min_compile_time_secs",
        float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
    )
    jax.config.update(
        "jax_persistent_cache_min_entry_size_bytes",
        int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]),
    )
    jax.config.update(
        "jax_compilation_cache_max_size", int(os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"])
    )

jax.config.update("jax_default_matmul_precision", "highest")
