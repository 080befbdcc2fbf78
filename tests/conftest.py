"""Test-wide settings: float32 matmuls at full precision, so parity bounds mean what they say;
a persistent compilation cache for the test run.

Under pytest-xdist (`make test` runs 2 processes) a GPU is shared, so no process preallocates
most of its memory.

Compilation is most of the suite's time: a PermuQuant-H search on the tiny FLUX compiles for
69 s and then runs in 0.2 s. So jax's persistent cache keeps every program that took over
0.1 s to compile, in `~/.cache/pqjax/jax-tests/<cpu>` ($XDG_CACHE_HOME honoured;
PQJAX_TEST_JAX_CACHE=<folder> moves it, PQJAX_TEST_JAX_CACHE=0 turns it off). Tests that build
the same program again (after the programs were freed, see below; a new jit wrapper, a
restored model, a CLI or multi-device subprocess, the other xdist process) load it, and a
second run compiles little. It is set through jax's environment variables, so the subprocesses
that tests start use it too.
- A size limit turns on jax's file lock around every read and write, so neither xdist process
  reads an entry the other is still writing. jax then lists the whole folder on every write
  (its LRU eviction: a stat and a read per entry), so programs under 0.1 s are not kept;
  keeping every program made 10k entries in 70% of a run.
- <cpu> is a digest of the processor's model and instruction-set flags: an executable compiled
  for one CPU is never loaded on another, where it might not run, or might round differently.
- A run with the cache once segfaulted inside jax's cache read. That run predates freeing each
  file's programs (`_release_compiled_programs`); runs without the cache later segfaulted
  too, near the kernel's memory-map limit, which is the likely cause of both (not proven).
  If it comes back, PQJAX_TEST_JAX_CACHE=0 turns the cache off.

pqjax's own command cache (pqjax.compile_cache) sees jax's folder already set and keeps it, so
CLI subprocesses never write to the user's ~/.cache/pqjax/jax.

Compiled programs are kept across test files until the process holds many memory maps (see
`_release_compiled_programs`), and XLA compiles CPU code at -O0 (see XLA_FLAGS below).
"""

import os
import sys

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

os.environ.setdefault("PQJAX_COMPILE_CACHE", "0")

# LLVM at -O0 for XLA's CPU code: compilation is most of the suite's time, and the tests
# assert no timings. Measured on 2 cores with no compilation cache: tests/baselines/
# test_svdquant.py 155 s -> 123 s, a PermuQuant-H plan on the tiny FLUX 98 s -> 64 s (its
# second call, compiled: 0.24 s -> 0.43 s). Results may differ from -O2 in the last bits,
# which no test relies on (CI CPUs differ the same way). An optimization level already in
# XLA_FLAGS is kept.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()


def _cpu_key() -> str:
    """A digest of the CPU's model and feature flags (Linux), else of the platform's name."""
    import hashlib
    import platform

    text = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
        text += "".join(sorted(set(lines)))
    except OSError:
        pass
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _test_cache_dir() -> str:
    """The jax cache folder for this run, or "" when PQJAX_TEST_JAX_CACHE turns it off."""
    from pqjax import compile_cache  # imports no jax

    value = os.environ.get("PQJAX_TEST_JAX_CACHE")
    if value is not None:
        return "" if value.strip().lower() in ("", *compile_cache.OFF) else value
    return str(compile_cache.user_dir() / "jax-tests" / _cpu_key())


_CACHE_ENV = {
    "JAX_COMPILATION_CACHE_DIR": _test_cache_dir(),
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


def _memory_maps() -> int | None:
    """How many memory maps this process holds (Linux), else None."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


def _map_limit() -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65530  # Linux's default


@pytest.fixture(autouse=True)
def _release_compiled_programs():
    """Free the compiled programs when a test ends with this process's memory maps past a
    third of the kernel's limit (vm.max_map_count), and at each test file's end where the
    count can't be read. A worker that ran hundreds of tests held so many XLA CPU executables
    that their maps approached the limit (65530 here: 15k maps after three test files) and XLA
    segfaulted while compiling; one file of every method on three models reached the limit by
    itself (about 3000 maps per method), so the count is read after every test (a read of
    /proc/self/maps, milliseconds). Freeing unconditionally instead recompiled the same small
    programs again and again: 17k compilations of single jax operations, 28% of a cold run's
    test time, when it was done at every file's end."""
    yield
    maps = _memory_maps()
    if maps is not None and maps > _map_limit() // 3:
        jax.clear_caches()
        gc.collect()


@pytest.fixture(autouse=True, scope="module")
def _release_where_maps_are_unknown():
    """Without /proc/self/maps, free the compiled programs at each test file's end."""
    yield
    if _memory_maps() is None:
        jax.clear_caches()
        gc.collect()
