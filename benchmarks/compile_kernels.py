"""Compile every Pallas kernel variant and block config to cubins for sm_80, sm_90a, sm_120.

    .venv/bin/python benchmarks/compile_kernels.py            # all variants (minutes, CPU)
    .venv/bin/python benchmarks/compile_kernels.py --table    # the block-config table only

No GPU: Pallas lowers each kernel to TTIR on CPU and the PyPI `triton` package compiles that
TTIR (not a stand-in kernel: `stand_in` is false in every record) through PTX to a cubin with
its bundled ptxas; see benchmarks/triton_compile.py. Per (kernel, config, target) it records
registers per thread, spills, shared memory, the occupancy that follows and the SASS
instruction mix (the MMA opcodes; whether the FP8 path issues FP8 MMAs).

Shapes are FLUX.1-dev's: d = 3072, 4096 + 512 tokens, the (K, N) = (3072, 3072) projection.
The norm variants carry every optional input (perm, weight, bias, per-batch scale and shift)
and write the 16-bit output besides the codes (the heaviest form of each kernel).

Writes benchmarks/results/kernels_compiled.{json,md}: the JSON is a list of records with
kernel, config, target, compiled, registers, spills, shared_bytes, stand_in and more.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.triton_compile import (
    TARGETS,
    TritonKernel,
    capture_kernels,
    compile_kernel,
    compile_kernel_xla,
    triton_version,
    xla_triton_available,
)
from pallas_kernels import configs
from pallas_kernels.fp4_matmul import fp4_matmul, w4a16_matmul
from pallas_kernels.permuted_norm import KINDS, permuted_norm
from pqjax import formats

S = jax.ShapeDtypeStruct
RESULTS = Path(__file__).resolve().parent / "results"
D, TOKENS, K, N = 3072, 4096 + 512, 3072, 3072
NORM_FORMATS = (None, "nvfp4", "mxfp4", "int4", "int4_asym")
# one d per NORM_TABLE row (the row is chosen by the padded tile Gp * H at group 16)
NORM_TABLE_D = (1024, 3072)
# one M per MATMUL_TABLE row (its upper bound; FLUX's 4608 tokens for the open row)
MATMUL_TABLE_M = (16, 64, 256, TOKENS)
MATMULS = ("nvfp4", "mxfp4_fp8", "mxfp4_bf16", "w4a16")
# FP8 MMAs exist from sm_89; pqjax.backends.dispatch takes the bf16 path below it
FP8_TARGETS = ("sm_90a", "sm_120")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One kernel form at one block config: lowers to exactly one TritonKernel."""

    kernel: str  # "norm/<kind>/<format>" or "matmul/<variant>"
    config: Any  # NormConfig | MatmulConfig
    shape: str
    table_row: int | None  # index in NORM_TABLE / MATMUL_TABLE, None off the table
    lower: Callable[[], TritonKernel]


def _qt(fmt: str, rows: int, k: int) -> formats.QTensor:
    return jax.eval_shape(formats.get(fmt).quantize, S((rows, k), jnp.float32))


def _norm_kernel(kind: str, fmt: str | None, d: int, cfg: configs.NormConfig) -> TritonKernel:
    x, vec, row = S((1, TOKENS, d), jnp.bfloat16), S((d,), jnp.bfloat16), S((1, d), jnp.bfloat16)
    gs = S((), jnp.float32) if fmt == "nvfp4" else None
    quant = None if fmt is None else formats.get(fmt)
    fn = functools.partial(permuted_norm, kind=kind, quant=quant, config=cfg)
    [kern] = capture_kernels(fn, x, S((d,), jnp.int32), vec, vec, row, row, gs)
    return kern


def _matmul_kernel(variant: str, m: int, cfg: configs.MatmulConfig) -> TritonKernel:
    bias = S((N,), jnp.bfloat16)
    if variant == "w4a16":
        fn = functools.partial(w4a16_matmul, config=cfg)
        [kern] = capture_kernels(fn, S((m, K), jnp.bfloat16), _qt("nvfp4", N, K), bias)
        return kern
    fmt = "nvfp4" if variant == "nvfp4" else "mxfp4"
    fn = functools.partial(fp4_matmul, config=cfg, fp8=variant == "mxfp4_fp8")
    kernels = capture_kernels(fn, _qt(fmt, m, K), _qt(fmt, N, K), bias)
    if variant == "mxfp4_fp8":  # lax.cond lowers both branches; keep the FP8 one
        [kern] = [k for k in kernels if "f8E4M3FN" in k.ttir]
        return kern
    [kern] = kernels
    return kern


def norm_variants(table_only: bool = False) -> Iterator[Variant]:
    """Each NORM_TABLE row (layer norm, NVFP4 out); then every kind x output format at FLUX's d."""
    for i, d in enumerate(NORM_TABLE_D):
        cfg = configs.norm_config(d, TOKENS, 16)
        yield Variant(
            "norm/layer/nvfp4",
            cfg,
            f"(1,{TOKENS},{d})",
            i,
            functools.partial(_norm_kernel, "layer", "nvfp4", d, cfg),
        )
    if table_only:
        return
    for kind in KINDS:
        for fmt in NORM_FORMATS:
            if (kind, fmt) == ("layer", "nvfp4"):
                continue  # the table row above
            group = 32 if fmt == "mxfp4" else 16
            cfg = configs.norm_config(D, TOKENS, group)
            yield Variant(
                f"norm/{kind}/{fmt or 'bf16'}",
                cfg,
                f"(1,{TOKENS},{D})",
                None,
                functools.partial(_norm_kernel, kind, fmt, D, cfg),
            )


def matmul_variants(table_only: bool = False) -> Iterator[Variant]:
    """NVFP4 W4A4 at each MATMUL_TABLE row; the other matmuls too unless table_only."""
    for variant in ("nvfp4", "mxfp4_fp8") if table_only else MATMULS:
        for i, m in enumerate(MATMUL_TABLE_M):
            cfg = configs.matmul_config(m, N, K)
            yield Variant(
                f"matmul/{variant}",
                cfg,
                f"M={m},K={K},N={N}",
                i,
                functools.partial(_matmul_kernel, variant, m, cfg),
            )


def targets_for(v: Variant) -> tuple[str, ...]:
    return FP8_TARGETS if v.kernel == "matmul/mxfp4_fp8" else tuple(TARGETS)


def config_str(cfg: Any) -> str:
    return ",".join(f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg))


def _cache_dir() -> Path:
    return Path(os.environ.get("PQJAX_CUBIN_CACHE", Path.home() / ".cache" / "pqjax-cubins"))


def compiler_name(xla: bool) -> str:
    if xla:
        return f"XLA's Triton (jax-cuda13-plugin {importlib.metadata.version('jax-cuda13-plugin')})"
    return f"triton {triton_version()} (PyPI)"


def compile_cached(kern: TritonKernel, target: str, xla: bool = False) -> dict[str, Any]:
    """compile_kernel (or compile_kernel_xla), memoized on disk by (TTIR, launch options,
    target, compiler and version)."""
    key = json.dumps([kern.ttir, kern.num_warps, kern.num_stages, target, compiler_name(xla)])
    path = _cache_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"
    if path.exists():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            pass  # a torn or corrupted entry: compile again and overwrite it
    rec = (compile_kernel_xla if xla else compile_kernel)(kern, target)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(rec))
    tmp.replace(path)
    return rec


def record(v: Variant, kern: TritonKernel, target: str, xla: bool = False) -> dict[str, Any]:
    """One JSON record: the required keys first, then the details."""
    t0 = time.perf_counter()
    res = compile_cached(kern, target, xla)
    return {
        "kernel": v.kernel,
        "config": config_str(v.config),
        "target": target,
        "compiled": res["compiled"],
        "registers": res.get("registers"),
        "spills": res.get("spills"),
        "shared_bytes": res.get("shared_bytes"),
        "stand_in": False,
        "compiler": compiler_name(xla),
        "shape": v.shape,
        "table_row": v.table_row,
        "num_warps": kern.num_warps,
        "num_stages": kern.num_stages,
        "grid": list(kern.grid),
        **{
            k: val
            for k, val in res.items()
            if k not in ("compiled", "registers", "spills", "shared_bytes")
        },
        "compile_s": round(time.perf_counter() - t0, 2),
    }


def run(
    table_only: bool, xla: bool = False, log: Callable[[str], None] = print
) -> list[dict[str, Any]]:
    """Lower and compile every variant for its targets (the FP8 one on sm_90a / sm_120)."""
    recs = []
    for v in [*norm_variants(table_only), *matmul_variants(table_only)]:
        kern = v.lower()
        for target in targets_for(v):
            r = record(v, kern, target, xla)
            recs.append(r)
            mma = r.get("instructions", {}).get("sass_mma") if r["compiled"] else r.get("error")
            log(
                f"{v.kernel:22s} {target:7s} {r['config']:60s} regs={r['registers']} "
                f"spills={r['spills']} smem={r['shared_bytes']} {mma} ({r['compile_s']} s)"
            )
    return recs


def _fmt_mix(r: dict[str, Any]) -> str:
    if not r["compiled"]:
        return "—"
    ins = r["instructions"]
    mma = ", ".join(f"{k} {v}" for k, v in ins["sass_mma"].items()) or "no MMA"
    local = f"; LDL/STL {ins['local_mem_ops']}" if ins["local_mem_ops"] else ""
    return mma + local


def table_md(recs: list[dict[str, Any]]) -> str:
    """The compiled-resources table (Markdown), one line per (kernel, config, target)."""
    head = (
        "| kernel | config | target | compiled | regs/thread | spill bytes | smem (KiB) "
        "| occupancy (limit) | SASS MMA; local-memory ops |"
    )
    lines = [head, "|" + " --- |" * 9]
    for r in recs:
        occ = f"{r['occupancy']:.0%} ({r['occupancy_limit']})" if r["compiled"] else "—"
        smem = f"{r['shared_bytes'] / 1024:.1f}" if r["compiled"] else "—"
        ok = "yes" if r["compiled"] else f"no: {r.get('error', '')[:60]}"
        row = "" if r["table_row"] is None else f" (table row {r['table_row']})"
        lines.append(
            f"| {r['kernel']}{row} | {r['config']} | {r['target']} | {ok} | {r['registers'] or '—'}"
            f" | {r['spills'] if r['compiled'] else '—'} | {smem} | {occ} | {_fmt_mix(r)} |"
        )
    return "\n".join(lines) + "\n"


def write(recs: list[dict[str, Any]], xla: bool = False) -> None:
    """benchmarks/results/kernels_compiled[_xla].json (a list of records) and .md, atomically."""
    name = "kernels_compiled_xla" if xla else "kernels_compiled"
    RESULTS.mkdir(parents=True, exist_ok=True)
    route = (
        "XLA's own Triton (the jax CUDA plugin's `compile_triton_to_asm`, the compiler that "
        "builds these kernels on a GPU; its handler registers without a GPU when "
        "JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1) compiles that TTIR to PTX, and the CUDA "
        "toolkit's `ptxas -v` to a cubin"
        if xla
        else "the PyPI `triton` package compiles that TTIR through PTX to a cubin with its own "
        "ptxas; on a GPU, XLA compiles the same TTIR with its bundled Triton "
        "(kernels_compiled_xla.md: the table's configs that way)"
    )
    md = (
        f"# Kernels compiled for sm_80, sm_90a, sm_120 (no GPU)\n\n"
        f"Compiler: {compiler_name(xla)}. Pallas (jax {jax.__version__}) lowers each kernel to "
        f"TTIR on CPU; {route}. `ptxas -v` gives registers and spill bytes (stores + loads); "
        f"Triton's metadata the shared memory. These are the real kernels, not stand-ins. "
        f"Occupancy: resident warps / the SM's maximum, from registers, shared memory and warps "
        f"per block. MMA counts are static SASS instructions (cuobjdump -sass).\n\n"
        + table_md(recs)
    )
    for path, text in (
        (RESULTS / f"{name}.json", json.dumps(recs, indent=1) + "\n"),
        (RESULTS / f"{name}.md", md),
    ):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="the block-config table only")
    parser.add_argument("--xla", action="store_true", help="compile with XLA's Triton instead")
    args = parser.parse_args()
    if args.xla:
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # no GPU libraries here
        if not xla_triton_available():
            print("--xla needs jax-cuda13-plugin and jax-cuda13-pjrt", file=sys.stderr)
            return 2
    elif triton_version() is None:
        print("triton is not installed: pip install -c constraints.txt triton", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    recs = run(args.table, args.xla)
    write(recs, args.xla)
    print(f"{len(recs)} records in {time.perf_counter() - t0:.0f} s -> {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
