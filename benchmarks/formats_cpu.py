"""Number-format throughput on CPU: jitted pqjax quantize / dequantize against the numpy reference.

    .venv/bin/python benchmarks/formats_cpu.py            # 3072 x 12288 float32 (the issue's size)
    .venv/bin/python benchmarks/formats_cpu.py --quick    # 256 x 1024, a smoke run

Throughput is GB/s of the input tensor's float32 bytes (rows * cols * 4) in both directions,
median of several repeats after warm-up. The numpy reference (tests/formats/numpy_reference.py,
with its ml_dtypes rounding back end) runs in the same process on the same tensor; ratio =
numpy time / jax time (> 1: JAX faster). Every jax result is also compared bit for bit with the
reference. Writes benchmarks/results/formats_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import timeit, write_results
from pqjax import formats
from tests.formats import numpy_reference as ref

CASES = [
    ("nvfp4", {}),
    ("mxfp4", {}),
    ("int4", {"group": 64}),
    ("int3", {"group": 64}),
    ("fp8", {"scaling": "tensor"}),
    ("fp8", {"scaling": "token"}),
]


def _label(name: str, kw: dict) -> str:
    extra = ", ".join(f"{k}={v}" for k, v in kw.items())
    return f"{name} ({extra})" if extra else name


def _bit_exact(qt, dq, want: dict) -> bool:
    """Stored arrays and dequantized values identical, bit for bit, to the reference."""
    pairs = [(qt.codes, want["codes"]), (qt.block_scale, want["block_scale"]), (dq, want["dq"])]
    if "global_scale" in want:
        pairs.append((qt.global_scale, want["global_scale"]))
    for got, exp in pairs:
        got, exp = np.atleast_1d(np.asarray(got)), np.atleast_1d(np.asarray(exp))
        if got.dtype != exp.dtype or got.shape != exp.shape:
            return False
        if not np.array_equal(got.view(np.uint8), exp.view(np.uint8)):
            return False
    return True


def bench_case(name: str, kw: dict, x: np.ndarray, xj: jax.Array, reps: tuple[int, int]) -> dict:
    """Time one format both ways, in jax and in the numpy reference; check the bits."""
    fmt = formats.get(name, **kw)
    cols = x.shape[-1]
    gb = x.nbytes / 1e9
    qf = jax.jit(fmt.quantize)
    df = jax.jit(lambda q: q.dequantize())
    qt = jax.block_until_ready(qf(xj))
    dq = jax.block_until_ready(df(qt))
    t_jq = timeit(lambda: jax.block_until_ready(qf(xj)), warmup=1, repeats=reps[0])
    t_jd = timeit(lambda: jax.block_until_ready(df(qt)), warmup=1, repeats=reps[0])
    want = ref.quantize(name, x, "ml_dtypes", **kw)
    want["dq"] = ref.dequantize(name, want, cols)
    # the reference call above is the numpy warm-up
    t_nq = timeit(lambda: ref.quantize(name, x, "ml_dtypes", **kw), warmup=0, repeats=reps[1])
    t_nd = timeit(lambda: ref.dequantize(name, want, cols), warmup=0, repeats=reps[1])
    return {
        "format": _label(name, kw),
        "bits_per_element": qt.bits_per_element,
        "bit_exact": _bit_exact(qt, dq, want),
        "jax_quantize_GBps": gb / t_jq["median_s"],
        "numpy_quantize_GBps": gb / t_nq["median_s"],
        "quantize_ratio": t_nq["median_s"] / t_jq["median_s"],
        "jax_dequantize_GBps": gb / t_jd["median_s"],
        "numpy_dequantize_GBps": gb / t_nd["median_s"],
        "dequantize_ratio": t_nd["median_s"] / t_jd["median_s"],
        "timings": {"jax_q": t_jq, "jax_dq": t_jd, "numpy_q": t_nq, "numpy_dq": t_nd},
    }


def run(rows: int, cols: int, jax_repeats: int, np_repeats: int) -> dict:
    rng = np.random.default_rng(0)
    # heavy-ish tails: normal values with lognormal per-channel scales
    x = (rng.standard_normal((rows, cols)) * rng.lognormal(0, 1, cols)).astype(np.float32)
    xj = jax.block_until_ready(jnp.asarray(x))
    results = []
    for name, kw in CASES:
        row = bench_case(name, kw, x, xj, (jax_repeats, np_repeats))
        results.append(row)
        print(
            f"{row['format']:<22} q {row['jax_quantize_GBps']:6.2f} GB/s (numpy "
            f"{row['numpy_quantize_GBps']:.3f}, x{row['quantize_ratio']:.1f})  dq "
            f"{row['jax_dequantize_GBps']:6.2f} GB/s (numpy {row['numpy_dequantize_GBps']:.3f}, "
            f"x{row['dequantize_ratio']:.1f})  bit-exact {row['bit_exact']}",
            flush=True,
        )
    return {"shape": [rows, cols], "input_GB": x.nbytes / 1e9, "results": results}


def table(payload: dict) -> str:
    lines = [
        "| format | bits/elem | jax quantize GB/s | numpy quantize GB/s | ratio | "
        "jax dequantize GB/s | numpy dequantize GB/s | ratio | bit-exact |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["results"]:
        lines.append(
            f"| {r['format']} | {r['bits_per_element']:.3f} | {r['jax_quantize_GBps']:.2f} | "
            f"{r['numpy_quantize_GBps']:.3f} | {r['quantize_ratio']:.1f}x | "
            f"{r['jax_dequantize_GBps']:.2f} | {r['numpy_dequantize_GBps']:.3f} | "
            f"{r['dequantize_ratio']:.1f}x | {'yes' if r['bit_exact'] else 'NO'} |"
        )
    rows, cols = payload["shape"]
    lines.append(
        f"\nInput: {rows} x {cols} float32 ({payload['input_GB']:.3f} GB); GB/s counts the input's "
        "float32 bytes in both directions; ratio = numpy time / jax time (> 1: JAX faster); "
        "medians after warm-up. JAX: jax.jit on the CPU backend (XLA uses all cores); numpy: "
        "tests/formats/numpy_reference.py with ml_dtypes casts (mostly single-threaded). "
        "bit-exact: codes, scales and dequantized values identical to the reference."
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="256 x 1024 smoke run")
    args = ap.parse_args()
    if args.quick:
        payload = run(256, 1024, jax_repeats=3, np_repeats=2)
    else:
        payload = run(3072, 12288, jax_repeats=5, np_repeats=3)
    md = table(payload)
    print(md)
    name = "formats_cpu_quick" if args.quick else "formats_cpu"
    print("wrote", write_results(name, payload, md))


if __name__ == "__main__":
    main()
