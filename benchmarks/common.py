"""Shared benchmark plumbing: timing, machine facts, and result files.

Every benchmark measures a ratio against a baseline run in the same process, prints a table,
and writes `benchmarks/results/<name>.json` and `.md`.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def timeit(fn: Callable[[], Any], *, warmup: int = 2, repeats: int = 5) -> dict[str, float]:
    """Median and min wall time of `fn()` (which must block until its result is ready)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": repeats}


def machine() -> dict[str, Any]:
    import jax

    info = {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "device": str(jax.devices()[0].device_kind),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def write_results(name: str, payload: dict[str, Any], table_md: str) -> Path:
    """Write `<name>.json` and `<name>.md` under benchmarks/results/."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine(), **payload}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    m = payload["machine"]
    header = (
        f"# {name}\n\nMeasured {m['date']} on {m['device']} ({m['cpu_count']} cores), "
        f"jax {m['jax']}" + (f", torch {m['torch']}" if "torch" in m else "") + "\n\n"
    )
    (RESULTS / f"{name}.md").write_text(header + table_md + "\n")
    return RESULTS / f"{name}.json"
