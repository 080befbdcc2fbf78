"""Test-wide settings: float32 matmuls at full precision, so parity bounds mean what they say.

Under pytest-xdist (`make test` runs 2 processes) a GPU is shared, so no process preallocates
most of its memory.

No persistent compilation cache by default. A run with one crashed with a segmentation fault
inside jax's cache read (`compilation_cache.get_executable_and_time`, deserializing an
executable the other xdist process had written), so programs are compiled in each process.
PQJAX_TEST_JAX_CACHE=<folder> turns jax's cache on for a local run, at that risk. pqjax's own
command cache (pqjax.compile_cache) is off too, so CLI subprocesses never write to the user's
~/.cache; tests of that cache turn it on in a temporary folder.
"""

import os
import sys

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

os.environ.setdefault("PQJAX_COMPILE_CACHE", "0")

_CACHE_ENV = {
    "JAX_COMPILATION_CACHE_DIR": os.environ.get("PQJAX_TEST_JAX_CACHE", ""),
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


import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Free each test file's compiled programs when it ends. A worker that ran hundreds of
    tests held so many XLA CPU executables that their memory maps approached the kernel's
    limit (vm.max_map_count, 65530 here: 15k maps after three test files) and XLA segfaulted
    while compiling."""
    yield
    jax.clear_caches()
    gc.collect()
