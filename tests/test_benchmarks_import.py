"""Every benchmark script still imports: they run by hand, outside the test suite, so an API
they use can move without any test noticing (benchmarks/heldout_layers.py imported
`pqjax.quantize.quantize` after it had moved to `pqjax.engine`)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

SCRIPTS = sorted(p.stem for p in (Path(__file__).parents[1] / "benchmarks").glob("*.py")
                 if p.stem != "__init__")


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_imports(name):
    module = importlib.import_module(f"benchmarks.{name}")
    assert module.__doc__, f"benchmarks/{name}.py has no docstring with its run command"
