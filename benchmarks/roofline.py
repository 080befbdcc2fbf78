"""Roofline predictions (not measurements) of the kernels and FLUX blocks on H100, H200, RTX 5090.

    .venv/bin/python benchmarks/roofline.py

Each kernel's time is max(bytes / HBM bandwidth, FLOPs / tensor throughput): the bytes are the
compulsory traffic counted from its inputs and outputs (each read or written once; re-reads of
tiles that miss L2 and launch overheads are not counted), the FLOPs 2 M N K for a matmul. A
kernel runs at the throughput of the MMA it issues: the FP4 matmul dequantizes NVFP4 to bf16
MMAs and MXFP4 to FP8 MMAs (sm_89 and up), so its compute roof is bf16 / FP8, not FP4.

A full-width FLUX.1-dev double block (4096 image + 512 text tokens, d = 3072, 24 heads of 128,
MLP 12288) and single block are summed from those kernels plus attention (bf16 flash attention
at the bf16 roof in both) and the elementwise passes between them. W4A4: fused norm (LayerNorm
+ modulation + NVFP4 codes), NVFP4 x NVFP4 matmuls, a quantize pass for each matmul whose
input is not a norm's output; bf16: XLA's norm and modulation passes and bf16 matmuls.

Writes benchmarks/results/roofline.{json,md}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"
T = 1e12

# Published peaks, dense (no structured sparsity; the datasheets print sparse figures twice
# these), in bytes/s and FLOP/s:
# * H100 SXM5: NVIDIA H100 Tensor Core GPU datasheet (2023): HBM3 3.35 TB/s; BF16 1979 and
#   FP8 3958 TFLOPS "with sparsity" -> 989.4 / 1978.9 dense. No FP4 tensor cores.
# * H200 SXM: NVIDIA H200 Tensor Core GPU datasheet (2024): HBM3e 4.8 TB/s; the same
#   tensor throughput as H100 SXM (BF16 1979, FP8 3958 with sparsity).
# * RTX 5090: NVIDIA RTX Blackwell GPU Architecture whitepaper (2025), GeForce RTX 5090 table:
#   GDDR7 1792 GB/s; FP4 3352 TOPS with sparsity (the "AI TOPS") -> 1676 dense; FP8 with
#   FP32 accumulate 838 sparse -> 419 dense; FP16/BF16 with FP32 accumulate 419 sparse ->
#   209.5 dense (GeForce parts run FP32-accumulate MMAs at half the FP16-accumulate rate).
#   The kernels accumulate in float32, so these are the rates that apply.
GPUS: dict[str, dict[str, float]] = {
    "H100 SXM": dict(hbm=3.35e12, bf16=989.4 * T, fp8=1978.9 * T, fp4=0.0, sms=132),
    "H200 SXM": dict(hbm=4.8e12, bf16=989.4 * T, fp8=1978.9 * T, fp4=0.0, sms=132),
    "RTX 5090": dict(hbm=1.792e12, bf16=209.5 * T, fp8=419.0 * T, fp4=1676.0 * T, sms=170),
}
D, HEADS, HEAD_DIM, MLP = 3072, 24, 128, 12288
IMG, TXT = 4096, 512
TOKENS = IMG + TXT
MS = (1, 16, 64, 256, 1024, TOKENS)
MATMUL_KN = ((3072, 3072), (3072, 12288), (12288, 3072))
GOAL_NORM_HBM = 0.70  # the fused norm at >= 70 % of HBM peak
GOAL_FP4_SPEEDUP = 2.0  # the FP4 matmul >= 2x bf16 at M <= 256


def nvfp4_bytes(rows: int, k: int) -> float:
    """Codes (2 per byte) + one E4M3 scale per 16 values (the per-tensor scale is negligible)."""
    return rows * k / 2 + rows * k / 16


def kernel(name: str, nbytes: float, flops: float, roof: str) -> dict[str, Any]:
    return {"kernel": name, "bytes": nbytes, "flops": flops, "roof": roof}


def norm_kernels(tokens: int, d: int = D) -> dict[str, dict[str, Any]]:
    """Fused permuted LayerNorm + modulation + NVFP4 codes vs XLA's separate passes (bf16 y)."""
    x = tokens * d * 2
    vecs = d * 4 + 2 * d * 2  # the permutation (int32), scale and shift rows
    return {
        # read x, perm, scale, shift; write codes + scales (no 16-bit y: dense=False)
        "fused_norm_nvfp4": kernel(
            "fused norm -> NVFP4", x + vecs + nvfp4_bytes(tokens, d), 10.0 * tokens * d, "none"
        ),
        # bf16 model: XLA fuses LayerNorm and modulate into one pass (read x, write y)
        "norm_modulate_bf16": kernel(
            "LayerNorm + modulate (bf16)", 2 * x + 2 * d * 2, 10.0 * tokens * d, "none"
        ),
    }


def matmul_kernels(m: int, k: int, n: int) -> dict[str, dict[str, Any]]:
    """(M, K) @ (K, N) + bias: bf16, W4A4 NVFP4 (bf16 MMA), MXFP4 (FP8 MMA), W4A16."""
    f, out, bias = 2.0 * m * n * k, m * n * 2, n * 2
    mx = m * k / 2 + m * k / 32 + n * k / 2 + n * k / 32  # MXFP4: one E8M0 byte per 32
    return {
        "bf16": kernel("bf16 matmul", m * k * 2 + n * k * 2 + out + bias, f, "bf16"),
        "w4a4_nvfp4": kernel(
            "W4A4 NVFP4", nvfp4_bytes(m, k) + nvfp4_bytes(n, k) + out + bias, f, "bf16"
        ),
        "w4a4_mxfp4_fp8": kernel("W4A4 MXFP4 (FP8 MMA)", mx + out + bias, f, "fp8"),
        "w4a16": kernel("W4A16 NVFP4", m * k * 2 + nvfp4_bytes(n, k) + out + bias, f, "bf16"),
    }


def predict(k: dict[str, Any], gpu: dict[str, float]) -> dict[str, Any]:
    """Roofline time (s) of one kernel on one GPU and what bounds it."""
    t_mem = k["bytes"] / gpu["hbm"]
    t_cmp = 0.0 if k["roof"] == "none" else k["flops"] / gpu[k["roof"]]
    return {"time_s": max(t_mem, t_cmp), "bound": "memory" if t_mem >= t_cmp else "compute"}


def elementwise(tokens: int, width: int, reads: int, writes: int) -> float:
    return tokens * width * 2.0 * (reads + writes)


def attention(tokens: int) -> dict[str, Any]:
    """Flash attention over all tokens: Q, K, V read, O written once; 4 T^2 H Dh FLOPs."""
    return kernel(
        "attention (bf16)", 4 * tokens * D * 2, 4.0 * tokens**2 * HEADS * HEAD_DIM, "bf16"
    )


BLOCK_MODES = ("bf16", "w4a4_nvfp4", "w4a4_mxfp4_fp8")


def block_kernels(kind: str, mm: str) -> list[tuple[dict[str, Any], int]]:
    """(kernel, count) making up one FLUX block's forward; kind 'double' | 'single', mm one of
    BLOCK_MODES (the MXFP4 norm output is counted as NVFP4's: 1/32 fewer scale bytes)."""
    w4a4 = mm != "bf16"
    norm = "fused_norm_nvfp4" if w4a4 else "norm_modulate_bf16"
    ks: list[tuple[dict[str, Any], int]] = []

    def linear(m: int, k: int, n: int, fed_by_norm: bool) -> None:
        ks.append((matmul_kernels(m, k, n)[mm], 1))
        if w4a4 and not fed_by_norm:  # its bf16 input is quantized by a separate pass
            ks.append((kernel("quantize -> NVFP4", m * k * 2 + nvfp4_bytes(m, k), 0, "none"), 1))

    streams = ((IMG, 1), (TXT, 1)) if kind == "double" else ((TOKENS, 1),)
    for tokens, _ in streams:
        n_mod = 6 if kind == "double" else 3
        linear(1, D, n_mod * D, fed_by_norm=False)  # AdaLN modulation from the time embedding
        ks.append((norm_kernels(tokens)[norm], 1))
        if kind == "double":
            linear(tokens, D, 3 * D, fed_by_norm=True)  # q, k, v
        else:
            linear(tokens, D, 3 * D + MLP, fed_by_norm=True)  # q, k, v and the MLP's fc1
        ks.append((kernel("q/k RMSNorm + RoPE", elementwise(tokens, 2 * D, 1, 1), 0, "none"), 1))
    ks.append((attention(TOKENS), 1))
    for tokens, _ in streams:
        if kind == "double":
            linear(tokens, D, D, fed_by_norm=False)  # attention output projection
            ks.append((kernel("gated residual", elementwise(tokens, D, 2, 1), 0, "none"), 2))
            ks.append((norm_kernels(tokens)[norm], 1))
            linear(tokens, D, MLP, fed_by_norm=True)  # fc1
            ks.append((kernel("GELU", elementwise(tokens, MLP, 1, 1), 0, "none"), 1))
            linear(tokens, MLP, D, fed_by_norm=False)  # fc2
        else:
            ks.append((kernel("GELU + concat", elementwise(tokens, MLP + D, 1, 1), 0, "none"), 1))
            linear(tokens, D + MLP, D, fed_by_norm=False)  # proj_out of [attn, mlp]
            ks.append((kernel("gated residual", elementwise(tokens, D, 2, 1), 0, "none"), 1))
    return ks


def block_time(kind: str, mm: str, gpu: dict[str, float]) -> float:
    return sum(predict(k, gpu)["time_s"] * n for k, n in block_kernels(kind, mm))


def run() -> dict[str, Any]:
    out: dict[str, Any] = {
        "predictions_not_measurements": True,
        "gpus": GPUS,
        "norm": [],
        "matmul": [],
        "blocks": [],
    }
    for gname, gpu in GPUS.items():
        for name, k in norm_kernels(TOKENS).items():
            p = predict(k, gpu)
            out["norm"].append(
                {
                    "gpu": gname,
                    "variant": name,
                    "bytes": k["bytes"],
                    **p,
                    "hbm_fraction": k["bytes"] / p["time_s"] / gpu["hbm"],
                }
            )
        for k_dim, n_dim in MATMUL_KN:
            for m in MS:
                ks = matmul_kernels(m, k_dim, n_dim)
                base = predict(ks["bf16"], gpu)["time_s"]
                for name, kk in ks.items():
                    p = predict(kk, gpu)
                    out["matmul"].append(
                        {
                            "gpu": gname,
                            "variant": name,
                            "m": m,
                            "k": k_dim,
                            "n": n_dim,
                            **p,
                            "speedup_vs_bf16": base / p["time_s"],
                            "tflops": kk["flops"] / p["time_s"] / T,
                        }
                    )
        for kind in ("double", "single"):
            t = {mm: block_time(kind, mm, gpu) for mm in BLOCK_MODES}
            out["blocks"].append(
                {
                    "gpu": gname,
                    "block": kind,
                    **{f"{mm}_s": v for mm, v in t.items()},
                    **{f"speedup_{mm}": t["bf16"] / t[mm] for mm in BLOCK_MODES[1:]},
                }
            )
    return out


GPU_TARGET = {"H100 SXM": "sm_90a", "H200 SXM": "sm_90a", "RTX 5090": "sm_120"}


def compiled_norm(gpu: str) -> str:
    """Registers and occupancy of FLUX's fused norm (d = 3072, NVFP4) on the GPU's target, from
    kernels_compiled.json where compile_kernels.py has written it."""
    path = RESULTS / "kernels_compiled.json"
    if not path.exists():
        return "—"
    for r in json.loads(path.read_text()):
        if (r["kernel"], r["table_row"], r["target"]) == ("norm/layer/nvfp4", 1, GPU_TARGET[gpu]):
            if r["compiled"]:
                return f"{r['registers']} regs, occupancy {r['occupancy']:.0%}"
    return "—"


def markdown(res: dict[str, Any]) -> str:
    lines = [
        "# Roofline predictions (NOT measurements)",
        "",
        "Every figure here is a prediction from published peak bandwidth and dense tensor "
        "throughput and from the bytes and FLOPs each kernel must move; no GPU ran. Real "
        "kernels reach a fraction of these roofs (the compiled-resources table, "
        "kernels_compiled.md, shows occupancy and spills that lower it).",
        "",
        "## Fused norm (FLUX: 4608 tokens, d = 3072, LayerNorm + modulation -> NVFP4)",
        "",
        "| GPU | variant | MB moved | predicted µs | HBM fraction at the roof | goal "
        "| compiled (kernels_compiled.md) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in res["norm"]:
        fused = r["variant"].startswith("fused")
        goal = f">= {GOAL_NORM_HBM:.0%} of HBM peak" if fused else ""
        lines.append(
            f"| {r['gpu']} | {r['variant']} | {r['bytes'] / 1e6:.1f} | "
            f"{r['time_s'] * 1e6:.1f} | {r['hbm_fraction']:.0%} | {goal} | "
            f"{compiled_norm(r['gpu']) if fused else ''} |"
        )
    lines += [
        "",
        "The norm is memory-bound (10 FLOPs per element): the roof is the HBM peak itself, so "
        "the goal asks whether the kernel keeps enough loads in flight to reach 70 % of it; "
        "that depends on occupancy and latency, which only the GPU run measures.",
    ]
    lines += [
        "",
        "## Matmuls (K, N) = (3072, 3072): predicted speedup over bf16 "
        f"(goal: W4A4 >= {GOAL_FP4_SPEEDUP:.0f}x at M <= 256)",
        "",
        "| GPU | M | bf16 µs | W4A4 NVFP4 µs (x) | W4A4 MXFP4-FP8 µs (x) | W4A16 µs (x) "
        "| meets goal (NVFP4) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for r in res["matmul"]:
        if (r["k"], r["n"]) == (3072, 3072):
            rows.setdefault((r["gpu"], r["m"]), {})[r["variant"]] = r

    def cell(r: dict[str, Any]) -> str:
        return f"{r['time_s'] * 1e6:.2f} ({r['speedup_vs_bf16']:.2f}x)"

    for (g, m), v in rows.items():
        meets = "" if m > 256 else ("yes" if v["w4a4_nvfp4"]["speedup_vs_bf16"] >= 2 else "no")
        lines.append(
            f"| {g} | {m} | {v['bf16']['time_s'] * 1e6:.2f} | {cell(v['w4a4_nvfp4'])} | "
            f"{cell(v['w4a4_mxfp4_fp8'])} | {cell(v['w4a16'])} | {meets} |"
        )
    lines += [
        "",
        "## FLUX blocks, one forward (4096 + 512 tokens): predicted ms",
        "",
        "| GPU | block | bf16 ms | W4A4 NVFP4 (bf16 MMA) ms (x) | W4A4 MXFP4 (FP8 MMA) ms (x) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in res["blocks"]:
        lines.append(
            f"| {r['gpu']} | {r['block']} | {r['bf16_s'] * 1e3:.3f} | "
            f"{r['w4a4_nvfp4_s'] * 1e3:.3f} ({r['speedup_w4a4_nvfp4']:.2f}x) | "
            f"{r['w4a4_mxfp4_fp8_s'] * 1e3:.3f} ({r['speedup_w4a4_mxfp4_fp8']:.2f}x) |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    res = run()
    RESULTS.mkdir(parents=True, exist_ok=True)
    for path, text in (
        (RESULTS / "roofline.json", json.dumps(res, indent=1) + "\n"),
        (RESULTS / "roofline.md", markdown(res)),
    ):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
