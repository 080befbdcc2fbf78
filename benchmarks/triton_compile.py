"""Compile the Triton IR that Pallas emits to PTX and a cubin for a named GPU, without a GPU.

Route: jax's Pallas Triton lowering (`lower_jaxpr_to_triton_module`) builds a TTIR module for
each `pallas_call`; with `lowering_platforms=("cuda",)` that runs on a CPU machine. Its text
form is read by the `triton` package from PyPI (`triton.compile` on a `.ttir` file with an
explicit `GPUTarget`), which lowers it through TTGIR, LLVM IR and PTX and runs the `ptxas` it
ships to a cubin. No driver is needed for any of that.

Caveat: on a GPU, XLA compiles the same TTIR with the Triton it bundles (a fork at another
commit, other pass options), so registers and shared memory there may differ from these.

    kernels = capture_kernels(fn, *shape_structs)      # [TritonKernel] in lowering order
    rec = compile_kernel(kernels[0], "sm_90a")          # resources, instruction mix
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import subprocess
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # XLA's Triton fuses FMAs too

# Per-target limits: CUDA C++ Programming Guide, "Compute Capabilities", Table "Technical
# Specifications per Compute Capability" (CUDA 13.0): max shared memory per block (opt-in)
# 163 KB (8.0) / 227 KB (9.0) / 99 KB (12.0); per SM 164 / 228 / 100 KB; 64 K 32-bit
# registers per SM; 255 registers per thread; resident warps per SM 64 / 64 / 48; resident
# blocks per SM 32 / 32 / 32. The CUDA Occupancy Calculator's allocation units: registers
# per warp in units of 256, shared memory in units of 128 bytes plus 1 KB reserved per block.
TARGETS: dict[str, dict[str, int]] = {
    "sm_80": dict(cc=80, smem_block=163 * 1024, smem_sm=164 * 1024, warps_sm=64, blocks_sm=32),
    "sm_90a": dict(cc=90, smem_block=227 * 1024, smem_sm=228 * 1024, warps_sm=64, blocks_sm=32),
    "sm_120": dict(cc=120, smem_block=99 * 1024, smem_sm=100 * 1024, warps_sm=48, blocks_sm=32),
}
REGS_SM, MAX_REGS_THREAD, REG_UNIT, SMEM_UNIT, SMEM_RESERVED = 65536, 255, 256, 128, 1024


@dataclasses.dataclass(frozen=True)
class TritonKernel:
    """One pallas_call's TTIR text and its launch parameters."""

    name: str
    ttir: str
    num_warps: int
    num_stages: int
    grid: tuple[int, int, int]


_BACKEND = re.compile(
    r"grid_x = (\d+) : i32, grid_y = (\d+) : i32, grid_z = (\d+) : i32, ir = \"[^\"]*\", "
    r"name = \"([^\"]+)\", num_stages = (\d+) : i32, num_warps = (\d+) : i32"
)


def capture_kernels(fn: Callable[..., Any], *args: Any) -> list[TritonKernel]:
    """Lower jit(fn)(*args) for CUDA and return each pallas_call's TTIR (lowering order).

    args: jax.ShapeDtypeStruct (or arrays / pytrees of them) as for jax.jit(fn).trace.
    """
    import jax
    from jax._src.pallas.triton import pallas_call_registration as reg

    modules: list[tuple[str, str]] = []
    lower = reg.lowering.lower_jaxpr_to_triton_module

    def recording(*a: Any, **k: Any) -> Any:
        res = lower(*a, **k)
        op = res.module.operation
        modules.append((op.attributes["sym_name"].value, op.get_asm(enable_debug_info=False)))
        return res

    reg.lowering.lower_jaxpr_to_triton_module = recording
    try:
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    finally:
        reg.lowering.lower_jaxpr_to_triton_module = lower
    calls = [m.groups() for m in _BACKEND.finditer(text)]
    if len(calls) != len(modules):
        raise RuntimeError(f"found {len(calls)} triton custom calls for {len(modules)} modules")
    out = []
    for (name, ttir), (gx, gy, gz, cname, stages, warps) in zip(modules, calls, strict=True):
        if cname != name:
            raise RuntimeError(f"custom call {cname!r} does not match module {name!r}")
        out.append(TritonKernel(name, ttir, int(warps), int(stages), (int(gx), int(gy), int(gz))))
    return out


def triton_version() -> str | None:
    """The installed triton's version, or None where it is missing."""
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _tool(name: str) -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def _parse_ptxas(log: str) -> dict[str, int]:
    """registers, spill bytes, stack frame and static smem from a `ptxas -v` log."""
    regs = re.search(r"Used (\d+) registers", log)
    if regs is None:
        raise RuntimeError(f"no register count in the ptxas log:\n{log}")
    spill_st = re.search(r"(\d+) bytes spill stores", log)
    spill_ld = re.search(r"(\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    smem = re.search(r"(\d+) bytes smem", log)
    return {
        "registers": int(regs.group(1)),
        "spill_stores": int(spill_st.group(1)) if spill_st else 0,
        "spill_loads": int(spill_ld.group(1)) if spill_ld else 0,
        "stack_bytes": int(stack.group(1)) if stack else 0,
        "static_smem": int(smem.group(1)) if smem else 0,
    }


def occupancy(target: str, registers: int, shared_bytes: int, num_warps: int) -> dict[str, Any]:
    """Resident blocks and warps per SM from registers/thread, smem/block and warps/block."""
    t = TARGETS[target]
    regs_warp = -(-registers * 32 // REG_UNIT) * REG_UNIT
    by_regs = REGS_SM // (regs_warp * num_warps)
    smem = -(-(shared_bytes + SMEM_RESERVED) // SMEM_UNIT) * SMEM_UNIT
    by_smem = t["smem_sm"] // smem
    by_warps = t["warps_sm"] // num_warps
    blocks = min(by_regs, by_smem, by_warps, t["blocks_sm"])
    limits = {"registers": by_regs, "shared": by_smem, "warps": by_warps, "blocks": t["blocks_sm"]}
    return {
        "blocks_per_sm": blocks,
        "occupancy": round(blocks * num_warps / t["warps_sm"], 4),
        "occupancy_limit": min(limits, key=limits.get),
    }


_MMA_PTX = re.compile(r"^\s*((?:wgmma\.mma_async|mma\.sync|tcgen05\.mma)[\w.]*)", re.M)


def instruction_mix(cubin: bytes, ptx: str) -> dict[str, Any]:
    """SASS opcode counts (cuobjdump -sass, static) and the PTX MMA instruction forms."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run(
            [str(_tool("cuobjdump")), "-sass", f.name], capture_output=True, text=True, check=True
        ).stdout
    ops = Counter(
        m.group(1).split(".")[0]
        for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
    )
    ptx_mma = Counter(m.group(1) for m in _MMA_PTX.finditer(ptx))
    mma_ops = {k: v for k, v in ops.items() if "MMA" in k}
    return {
        "sass_total": sum(ops.values()),
        "sass_mma": mma_ops,
        "sass_top": dict(ops.most_common(12)),
        "ptx_mma": dict(ptx_mma),
        "fp8_mma": any("e4m3" in k for k in ptx_mma),
        "local_mem_ops": ops.get("LDL", 0) + ops.get("STL", 0),
    }


def compile_kernel(kernel: TritonKernel, target: str) -> dict[str, Any]:
    """TTIR -> PTX -> cubin for target ('sm_80' | 'sm_90a' | 'sm_120').

    Returns compiled, registers, spills (spill store + load bytes), shared_bytes (Triton's
    dynamic + ptxas' static), occupancy, instruction mix; or compiled=False with the error.
    """
    import triton
    from triton.backends.compiler import GPUTarget

    t = TARGETS[target]
    triton.knobs.nvidia.dump_ptxas_log = True  # ptxas -v lands on stdout
    triton.knobs.compilation.always_compile = True  # a cache hit would skip ptxas' log
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / f"{kernel.name}.ttir"
        src.write_text(kernel.ttir)
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):
                k = triton.compile(
                    str(src),
                    target=GPUTarget("cuda", t["cc"], 32),
                    options={"num_warps": kernel.num_warps, "num_stages": kernel.num_stages},
                )
        except Exception as e:  # a failed compile is a result: recorded
            msg = f"{type(e).__name__}: {e}"
            return {"compiled": False, "error": msg[:2000], "ptxas_log": log.getvalue()[-2000:]}
    res = _parse_ptxas(log.getvalue())
    ptx_target = re.search(r"^\.target (\S+)", k.asm["ptx"], re.M)
    shared = int(k.metadata.shared) + res["static_smem"]
    return {
        "compiled": True,
        "ptx_target": ptx_target.group(1) if ptx_target else None,
        "registers": res["registers"],
        "spills": res["spill_stores"] + res["spill_loads"],
        **{key: res[key] for key in ("spill_stores", "spill_loads", "stack_bytes")},
        "shared_bytes": shared,
        "shared_limit": t["smem_block"],
        "fits": shared <= t["smem_block"] and res["registers"] <= MAX_REGS_THREAD,
        **occupancy(target, res["registers"], shared, kernel.num_warps),
        "instructions": instruction_mix(k.asm["cubin"], k.asm["ptx"]),
    }


def xla_triton_available() -> bool:
    """Whether jax's CUDA plugin registered XLA's Triton compiler (importable without a GPU
    when JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 is set before jax initializes its backends)."""
    import jax
    from jax._src.lib import triton as jtriton

    jax.devices()  # backend discovery registers the plugin's handlers
    return jtriton.has_compilation_handler("CUDA")


def ptxas_path() -> str | None:
    """$PTXAS, else a CUDA toolkit's ptxas on PATH, else the one the triton package ships."""
    import shutil

    found = os.environ.get("PTXAS") or shutil.which("ptxas")
    if found:
        return found
    return str(_tool("ptxas-blackwell")) if triton_version() else None


def compile_kernel_xla(kernel: TritonKernel, target: str) -> dict[str, Any]:
    """TTIR -> PTX with XLA's own Triton (the jax CUDA plugin's compile_triton_to_asm: the
    compiler that builds these kernels on a GPU), then `ptxas -v` -> cubin. Same keys as
    compile_kernel, less the instruction mix where cuobjdump (the triton package) is missing."""
    from jax._src.lib import triton as jtriton

    t = TARGETS[target]
    arch = f"{t['cc'] // 10}.{t['cc'] % 10}"
    try:
        res = jtriton.compile("cuda", kernel.ttir.encode(), arch, num_warps=kernel.num_warps,
                              num_ctas=1, num_stages=kernel.num_stages)  # fmt: skip
    except Exception as e:  # a failed compile is a result: recorded
        return {"compiled": False, "error": f"{type(e).__name__}: {e}"[:2000]}
    ptx = res.asm
    sm = re.search(r"^\.target (\S+)", ptx, re.M)
    with tempfile.TemporaryDirectory() as d:
        src, out = Path(d) / "k.ptx", Path(d) / "k.cubin"
        src.write_text(ptx)
        p = subprocess.run([ptxas_path(), "-v", f"--gpu-name={sm.group(1)}", str(src), "-o",
                            str(out)], capture_output=True, text=True)  # fmt: skip
        if p.returncode:
            return {"compiled": False, "error": f"ptxas: {p.stderr[-1500:]}"}
        cubin = out.read_bytes()
    r = _parse_ptxas(p.stdout + p.stderr)
    shared = int(res.smem_bytes) + r["static_smem"]
    rec = {
        "compiled": True,
        "ptx_target": sm.group(1),
        "registers": r["registers"],
        "spills": r["spill_stores"] + r["spill_loads"],
        **{key: r[key] for key in ("spill_stores", "spill_loads", "stack_bytes")},
        "shared_bytes": shared,
        "shared_limit": t["smem_block"],
        "fits": shared <= t["smem_block"] and r["registers"] <= MAX_REGS_THREAD,
        **occupancy(target, r["registers"], shared, kernel.num_warps),
    }
    if triton_version():
        rec["instructions"] = instruction_mix(cubin, ptx)
    return rec
