"""GPU benchmarks of the Pallas kernels: fused permuted norm, FP4 matmuls, FLUX blocks.

    .venv/bin/python benchmarks/kernels_gpu.py                      # on a CUDA GPU
    .venv/bin/python benchmarks/kernels_gpu.py --parts norm,matmul  # some parts only
    .venv/bin/python benchmarks/kernels_gpu.py --interpret-smoke    # CPU: tiny shapes, interpret

(a) norm: the fused permuted LayerNorm + AdaLN modulation (+ NVFP4 / MXFP4 output) at FLUX's
    4096 + 512 tokens, d = 3072: GB/s and its share of the HBM peak (goal >= 70 %), and the
    speedup over XLA's gather + norm + modulate + quantize (goal >= 1.5x).
(b) matmul: W4A4 NVFP4 (bf16 MMA), W4A4 MXFP4 (FP8 MMA where exact), W4A16 NVFP4 against
    jnp.dot in bf16 (cuBLAS), TFLOP/s and speedup for FLUX's (K, N) and M = 1 .. 4608 (goal
    >= 2x at M <= 256, weight-bound).
(c) blocks: one full-width FLUX double block + one single block, random weights, W4A4 NVFP4
    with the "pallas" backend against the bf16 model: step time and memory.

Writes benchmarks/results/kernels_gpu.{json,md}; the smoke run writes kernels_gpu_smoke.*
(its timings are interpreter timings and mean nothing). Without a CUDA GPU and without
--interpret-smoke the script says so and exits with status 0.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import timeit, write_results
from pallas_kernels.fp4_matmul import fp4_matmul, fp8_exact, w4a16_matmul
from pallas_kernels.permuted_norm import permuted_norm, permuted_norm_reference
from pqjax import formats
from pqjax.backends import dispatch

# HBM peak bytes/s by device-kind substring (first match wins: specific names first)
HBM_PEAK = (
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM
    ("H200", 4.8e12),
    ("A100", 2.0e12),  # 80 GB SXM; the 40 GB part has 1.56e12
    ("RTX 5090", 1.79e12),
    ("RTX 4090", 1.01e12),
    ("L40S", 0.864e12),
)
FLUX_KN = ((3072, 3072), (3072, 9216), (3072, 12288), (12288, 3072), (15360, 3072), (3072, 18432))
FULL = dict(tokens=4096 + 512, d=3072, kn=FLUX_KN, ms=(1, 16, 64, 256, 1024, 4608))
SMOKE = dict(tokens=12, d=96, kn=((64, 48),), ms=(1, 19))
NO_GPU = (
    "No CUDA GPU here: the GPU figures are still to come. Run this script on a GPU machine "
    "(H100 / H200 / RTX 5090), or pass --interpret-smoke to check it on CPU with tiny shapes."
)


def hbm_peak() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((v for k, v in HBM_PEAK if k in kind), None)


def time_us(fn: Callable[[], Any], *, inner: int, repeats: int) -> float:
    """Median microseconds per call of fn, `inner` calls per timed run (hides dispatch)."""

    def run():
        out = None
        for _ in range(inner):
            out = fn()
        jax.block_until_ready(out)

    return 1e6 * timeit(run, warmup=1, repeats=repeats)["median_s"] / inner


def _rand(shape, dtype=jnp.bfloat16, seed=0, scale=1.0) -> jax.Array:
    return (jax.random.normal(jax.random.key(seed), shape) * scale).astype(dtype)


def _nbytes(*arrays) -> int:
    leaves = jax.tree_util.tree_leaves(arrays)
    return sum(int(a.size) * a.dtype.itemsize for a in leaves)


def bench_norm(shape: dict, interpret: bool, reps: dict) -> list[dict]:
    """(a) fused norm vs XLA on (1, tokens, d) bf16, random order and modulation rows."""
    t, d = shape["tokens"], shape["d"]
    x = _rand((1, t, d))
    perm = jax.random.permutation(jax.random.key(1), d).astype(jnp.int32)
    sc, sh = _rand((1, d), seed=2, scale=0.1), _rand((1, d), seed=3)
    peak = None if interpret else hbm_peak()
    rows = []
    for name, fmt, dense in (
        ("norm", None, True),
        ("norm + nvfp4", "nvfp4", True),
        ("nvfp4 only", "nvfp4", False),
        ("norm + mxfp4", "mxfp4", True),
    ):
        quant = None if fmt is None else formats.get(fmt)
        gs = jnp.float32(0.01) if fmt == "nvfp4" else None
        args = (x, perm, None, None, sc, sh, gs)
        kw = dict(kind="layer", quant=quant, dense=dense)
        fused = jax.jit(functools.partial(permuted_norm, **kw, interpret=interpret))
        xla = jax.jit(functools.partial(permuted_norm_reference, **kw))
        moved = _nbytes(x, perm, sc, sh) + _nbytes(jax.eval_shape(fused, *args))
        us_k = time_us(functools.partial(fused, *args), **reps)
        us_x = time_us(functools.partial(xla, *args), **reps)
        gbps = moved / us_k / 1e3
        rows.append(dict(variant=name, tokens=t, d=d, bytes=moved, us_kernel=us_k, us_xla=us_x,
                         speedup=us_x / us_k, gb_s=gbps,
                         pct_peak=None if peak is None else 100 * gbps * 1e9 / peak))  # fmt: skip
    return rows


def bench_matmul(shape: dict, interpret: bool, reps: dict) -> list[dict]:
    """(b) W4A4 NVFP4 / MXFP4 (FP8 where exact) and W4A16 NVFP4 vs bf16 jnp.dot."""
    nv, mx = formats.get("nvfp4"), formats.get("mxfp4")
    q_nv, q_mx = jax.jit(nv.quantize), jax.jit(mx.quantize)
    dot_bf16 = jax.jit(jnp.dot)
    w4a4 = jax.jit(functools.partial(fp4_matmul, interpret=interpret), static_argnames="fp8")
    w4a16 = jax.jit(functools.partial(w4a16_matmul, interpret=interpret))
    rows = []
    for k, n in shape["kn"]:
        w = _rand((n, k), jnp.float32, seed=5, scale=0.02)  # W^T, QuantLinear's layout
        w_bf16 = w.T.astype(jnp.bfloat16)
        wq_nv, wq_mx = q_nv(w), q_mx(w)
        for m in shape["ms"]:
            x = _rand((m, k), seed=m)
            a_nv, a_mx = q_nv(x), q_mx(x)
            calls = {
                "bf16 jnp.dot": functools.partial(dot_bf16, x, w_bf16),
                "W4A4 nvfp4": functools.partial(w4a4, a_nv, wq_nv),
                "W4A4 mxfp4 fp8": functools.partial(w4a4, a_mx, wq_mx, fp8=True),
                "W4A16 nvfp4": functools.partial(w4a16, x, wq_nv),
            }
            us = {name: time_us(call, **reps) for name, call in calls.items()}
            flops = 2 * m * n * k
            row = dict(m=m, k=k, n=n, fp8_exact=bool(fp8_exact(a_mx, wq_mx)))
            for name, t in us.items():
                row[f"us {name}"] = t
                row[f"tflops {name}"] = flops / t / 1e6
                row[f"speedup {name}"] = us["bf16 jnp.dot"] / t
            rows.append(row)
    return rows


def _flux_inputs(cfg, n_img: int, n_txt: int) -> dict:
    side = int(np.sqrt(n_img))
    r, c = np.meshgrid(np.arange(side), np.arange(n_img // side), indexing="ij")
    ids = np.stack([np.zeros(n_img), r.ravel(), c.ravel()], -1)
    return dict(
        hidden_states=_rand((1, n_img, cfg.in_channels), seed=7),
        encoder_hidden_states=_rand((1, n_txt, cfg.joint_attention_dim), seed=8),
        pooled_projections=_rand((1, cfg.pooled_projection_dim), seed=9),
        timestep=jnp.asarray([0.5], jnp.bfloat16),
        img_ids=jnp.asarray(ids, jnp.float32),
        txt_ids=jnp.zeros((n_txt, 3), jnp.float32),
        guidance=jnp.asarray([3.5], jnp.bfloat16),
    )


def bench_blocks(interpret: bool, reps: dict) -> list[dict]:
    """(c) double + single FLUX block: bf16 "xla" model vs W4A4 NVFP4 "pallas"."""
    from flax import nnx

    import pqjax
    from pqjax import permute
    from pqjax.backends import fusion
    from pqjax.models.flux import FluxConfig, FluxTransformer2DModel
    from pqjax.report import model_bytes

    if interpret:  # tiny model; the kernels run in the interpreter
        cfg = FluxConfig(
            num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=2,
            joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
            axes_dims_rope=(8, 12, 12), in_channels=8,
        )  # fmt: skip
        n_img, n_txt = 16, 8
    else:
        cfg = FluxConfig(num_layers=1, num_single_layers=1, guidance_embeds=True)
        n_img, n_txt = 4096, 512
    model = FluxTransformer2DModel(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    inputs = _flux_inputs(cfg, n_img, n_txt)

    def step_fn(m):
        graph, state = nnx.split(m)

        @jax.jit
        def run(state, inputs):
            mm = nnx.merge(graph, state)
            x, ctx, temb, rope = mm.embed(**inputs)
            ctx, x = mm.transformer_blocks[0](x, ctx, temb, rope)
            return mm.single_transformer_blocks[0](x, ctx, temb, rope)

        return lambda: run(state, inputs)

    rows = [dict(model="bf16", us=time_us(step_fn(model), **reps), **model_bytes(model))]
    sites = [s for s in permute.sites(model) if s.norms]
    pmodel = permute.absorb(
        model, {s.name: s.random(jax.random.key(i)) for i, s in enumerate(sites)}
    )
    calib = pqjax.calibrate(pmodel, [inputs], n_rows=64, progress=False)
    qmodel, _ = pqjax.quantize(pmodel, calib, pqjax.QuantConfig(method="rtn"))
    pqjax.set_backend(qmodel, "pallas")
    if interpret:
        os.environ[dispatch.ENV_INTERPRET] = "1"
    fused = sum(reason is None for reason in fusion.plan(qmodel).values())
    rows.append(dict(model="W4A4 nvfp4 (pallas)", us=time_us(step_fn(qmodel), **reps),
                     fused_norms=fused, **model_bytes(qmodel)))  # fmt: skip
    stats = jax.devices()[0].memory_stats() or {}
    for r in rows:
        r["speedup"] = rows[0]["us"] / r["us"]
        r["peak_bytes_in_use (process)"] = stats.get("peak_bytes_in_use")
    return rows


def _table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    return head + "".join("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |\n" for r in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interpret-smoke", action="store_true")
    parser.add_argument("--parts", default="norm,matmul,blocks")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    smoke = args.interpret_smoke
    if not smoke and dispatch.mode(interpret=False) != "kernel":
        print(NO_GPU)
        return 0
    shape = SMOKE if smoke else FULL
    reps = dict(inner=1, repeats=1) if smoke else dict(inner=20, repeats=args.repeats)
    parts = set(args.parts.split(","))
    payload: dict[str, Any] = {"smoke": smoke, "hbm_peak_bytes_s": hbm_peak()}
    md = []
    if smoke:
        md.append("Interpret-mode smoke run on CPU: the timings are meaningless; "
                  "the GPU figures are still to come.\n")  # fmt: skip
    if "norm" in parts:
        payload["norm"] = rows = bench_norm(shape, smoke, reps)
        cols = ["variant", "tokens", "d", "us_kernel", "us_xla", "speedup", "gb_s", "pct_peak"]
        md.append("## (a) fused permuted norm\n\n" + _table(rows, cols))
    if "matmul" in parts:
        payload["matmul"] = rows = bench_matmul(shape, smoke, reps)
        names = ["bf16 jnp.dot", "W4A4 nvfp4", "W4A4 mxfp4 fp8", "W4A16 nvfp4"]
        cols = ["m", "k", "n", "fp8_exact", *(f"tflops {n}" for n in names),
                *(f"speedup {n}" for n in names[1:])]  # fmt: skip
        md.append("## (b) FP4 matmuls (TFLOP/s, speedup over bf16)\n\n" + _table(rows, cols))
    if "blocks" in parts:
        payload["blocks"] = rows = bench_blocks(smoke, reps)
        cols = ["model", "us", "speedup", "quantized_bytes", "bf16_bytes", "packed_weight_bytes",
                "fused_norms"]
        md.append("## (c) FLUX double + single block\n\n" + _table(rows, cols))
    table = "\n".join(md)
    print(table)
    path = write_results("kernels_gpu_smoke" if smoke else "kernels_gpu", payload, table)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
