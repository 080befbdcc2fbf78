"""Test-wide settings: float32 matmuls at full precision, so parity bounds mean what they say.

Under pytest-xdist (`make test` runs 2 processes) a GPU is shared, so no process preallocates
most of its memory.
"""

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax

jax.config.update("jax_default_matmul_precision", "highest")
