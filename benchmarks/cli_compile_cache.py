"""What jax's persistent compilation cache saves a `pqjax` command: wall time of a second
identical call against the first, as a user runs them (fresh processes).

    .venv/bin/python benchmarks/cli_compile_cache.py            # 2 rounds
    .venv/bin/python benchmarks/cli_compile_cache.py --rounds 1

On the embedded model: `pqjax quantize` (int4 g64, 32 rows, no comparison) makes a checkpoint;
then `pqjax generate` of two prompts runs with an empty cache folder (the first call compiles
and stores), again with the same folder (the second call reads), and, as the control for
everything but compilation (imports, file cache), twice with the cache off. quantize is timed
the same way (first call, then the same call with --overwrite). Writes
benchmarks/results/cli_compile_cache.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import write_results  # noqa: E402


def run(args: list[str], cache: str) -> float:
    """Wall seconds of `python -m pqjax.cli args` with PQJAX_COMPILE_CACHE=cache."""
    env = {**os.environ, "PQJAX_COMPILE_CACHE": cache}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pqjax.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"pqjax {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return seconds


def entries(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    opts = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="pqjax-cc-"))
    ckpt = tmp / "ckpt"
    quant = [
        "quantize",
        "--out",
        str(ckpt),
        "--weights",
        "int4",
        "--group",
        "64",
        "--rows",
        "32",
        "--no-compare",
    ]
    qcache = tmp / "cache-quantize"
    q_first = run(quant, str(qcache))
    q_second = run([*quant, "--overwrite"], str(qcache))
    gen = ["generate", str(ckpt), "a handwritten digit 7", "3", "--overwrite"]
    rows = []
    for r in range(opts.rounds):
        cache = tmp / f"cache-generate-{r}"
        off1 = run([*gen, "--out", str(tmp / "off")], "0")
        first = run([*gen, "--out", str(tmp / "on")], str(cache))
        off2 = run([*gen, "--out", str(tmp / "off")], "0")
        second = run([*gen, "--out", str(tmp / "on")], str(cache))
        rows.append(
            dict(
                round=r,
                off_first_s=off1,
                off_second_s=off2,
                cache_first_s=first,
                cache_second_s=second,
                cache_entries=entries(cache),
            )
        )
    payload = dict(
        quantize=dict(first_s=q_first, second_s=q_second, cache_entries=entries(qcache)),
        generate=rows,
        note="wall time of fresh `python -m pqjax.cli` processes on the embedded model; "
        "the cache-off pair is the control",
    )
    lines = [
        "| command | cache | first call (s) | second call (s) | second / first |",
        "|---|---|---|---|---|",
        f"| quantize | on | {q_first:.1f} | {q_second:.1f} | {q_second / q_first:.2f} |",
    ]
    for row in rows:
        lines.append(
            f"| generate (round {row['round']}) | on | {row['cache_first_s']:.1f} | "
            f"{row['cache_second_s']:.1f} | {row['cache_second_s'] / row['cache_first_s']:.2f} |"
        )
        lines.append(
            f"| generate (round {row['round']}) | off | {row['off_first_s']:.1f} | "
            f"{row['off_second_s']:.1f} | {row['off_second_s'] / row['off_first_s']:.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    write_results("cli_compile_cache", payload, table)


if __name__ == "__main__":
    main()
