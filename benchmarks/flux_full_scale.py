"""FLUX.1-dev at full scale on this machine: the headline call in a memory budget.

    .venv/bin/python benchmarks/flux_full_scale.py --root /tmp/flux-dev-random    # ~1 h, 2 cores
    .venv/bin/python benchmarks/flux_full_scale.py --root ... --keep              # keep the folder

1. Writes a full-size FLUX.1-dev pipeline folder of random weights with the real configs: the
   transformer (11.9 B parameters, sharded bf16 safetensors), T5-XXL, CLIP-L, the VAE, small
   tokenizers, the scheduler config (about 34 GB; the work folder adds the quantized blocks).
2. In a child process, `pqjax.convert_and_quantize(root, W4A4 NVFP4 PermuQuant, 2 prompts,
   512x512, 3 steps, max_memory="12GiB")` (it takes the block-by-block path), then
   `generate` of one 512x512 image in 3 steps.
3. Samples the child's resident memory from outside (/proc/<pid>/status, every 0.2 s) and
   times each phase from the run's own records (the work folder's manifest stamps each
   stage); writes benchmarks/results/flux_full_scale.{json,md} with the peaks under
   `peak_rss_gib_quantize` and `peak_rss_gib_generate`, and deletes the folder.

The FLOP counts of each phase give a projection of the same work on an H100 and an RTX 5090
(`project`); its assumptions are written beside it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import write_results  # noqa: E402

PROMPTS = ["a photo of a red fox in the snow", "an astronaut riding a horse on mars"]
SIZE, STEPS, BUDGET = 512, 3, "12GiB"
GiB = 2**30
# Dense peaks from NVIDIA's datasheets (bf16 tensor cores, no sparsity), and the link that
# streams weights from host memory.
GPUS = {"H100 SXM": {"tflops": 989.0, "pcie_gbs": 55.0},
        "RTX 5090": {"tflops": 209.5, "pcie_gbs": 55.0}}
MFU = 0.4  # assumed share of the dense peak reached at these shapes (batch 2, 1536 tokens)


# ---- 1. the folder -----------------------------------------------------------------------------


def random_fill(seed: int) -> Any:
    """fill(key, torch shape, dtype) -> values like a fresh init: kernels N(0, 1/fan_in),
    norm weights 1, other vectors 0."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def fill(key: str, shape: tuple[int, ...], dtype: Any) -> Any:
        if len(shape) <= 1:
            value = 1.0 if "norm" in key or key.endswith(".scale") else 0.0
            return np.full(shape, value, dtype)
        fan_in = int(np.prod(shape[1:]))
        out = rng.standard_normal(shape, dtype=np.float32)
        out *= np.float32(fan_in ** -0.5)
        return out.astype(dtype)

    return fill


def write_folder(root: Path, rehearse: bool = False) -> dict[str, Any]:
    """The pipeline folder: every component exported from its abstract model with random
    values, one tensor at a time. rehearse: narrow, two-block versions of the same four
    components (minutes, to check the whole run before the hour it takes at full size)."""
    import dataclasses

    import jax.numpy as jnp
    from flax import nnx

    import convert
    from pqjax.models.clip import CLIP_L_FLUX, CLIPTextModel
    from pqjax.models.flux import FluxConfig, FluxTransformer2DModel
    from pqjax.models.t5 import T5_XXL_FLUX, T5EncoderModel
    from pqjax.models.vae import FLUX_VAE_CONFIG, AutoencoderKL
    from tests.models.test_tokenizers import write_clip_tokenizer, write_t5_tokenizer

    t0 = time.time()
    flux, t5, clip = FluxConfig(guidance_embeds=True), T5_XXL_FLUX, CLIP_L_FLUX
    if rehearse:
        flux = dataclasses.replace(flux, num_layers=2, num_single_layers=2,
                                   num_attention_heads=2, joint_attention_dim=64,
                                   pooled_projection_dim=64)
        t5 = dataclasses.replace(t5, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
        clip = dataclasses.replace(clip, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4)
    parts = {
        "transformer": (FluxTransformer2DModel, flux, 10 << 30),
        "text_encoder_2": (T5EncoderModel, t5, 5 << 30),
        "text_encoder": (CLIPTextModel, clip, None),
        "vae": (AutoencoderKL, FLUX_VAE_CONFIG, None),
    }
    for i, (name, (cls, config, shard)) in enumerate(parts.items()):
        model = nnx.eval_shape(lambda c=cls, f=config: c(f, dtype=jnp.bfloat16,
                                                         rngs=nnx.Rngs(0)))
        convert.export_model(model, root / name, max_shard_bytes=shard, fill=random_fill(i))
        print(f"wrote {name} ({time.time() - t0:.0f} s)", flush=True)
    write_clip_tokenizer(root / "tokenizer")
    write_t5_tokenizer(root / "tokenizer_2")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256,
        "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
        "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}))
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "FluxPipeline",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"]}))
    written = {"seconds": time.time() - t0, "bytes": folder_bytes(root)}
    (root / "written.json").write_text(json.dumps(written))  # kept with a reused folder
    return written


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---- 2. the child: the headline call, then one image ------------------------------------------


def child(root: Path, work: Path, budget: str) -> None:
    """What a user runs (its stdout: phase stamps, then the results as JSON)."""
    import numpy as np

    import pqjax

    def stamp(phase: str) -> None:
        print(f"PHASE {phase} {time.time()}", flush=True)

    def stamped(name: str, fn: Any) -> Any:  # marks where the call's pieces begin and end
        def call(*args: Any, **kwargs: Any) -> Any:
            stamp(f"{name}_start")
            out = fn(*args, **kwargs)
            stamp(f"{name}_end")
            return out

        return call

    from pqjax.engine.result import StoredModel
    from pqjax.pipelines.flux import FluxTextEncoders, VAEDecoder

    FluxTextEncoders.encode = stamped("encode", FluxTextEncoders.encode)
    VAEDecoder.decode = stamped("decode", VAEDecoder.decode)
    StoredModel.sampling_model = stamped("load_quantized", StoredModel.sampling_model)
    stamp("quantize")
    config = pqjax.QuantConfig(weights="nvfp4", acts="nvfp4", method="permuquant")
    pipe = pqjax.convert_and_quantize(root, config, PROMPTS, calib_steps=STEPS, height=SIZE,
                                      width=SIZE, max_memory=budget, work_dir=work)
    stamp("generate")
    image = pipe.generate(PROMPTS[:1], num_steps=STEPS, height=SIZE, width=SIZE, seed=0)
    stamp("done")
    out = {"image_shape": list(image.shape), "image_finite": bool(np.isfinite(image).all()),
           "summary": pipe.report.summary, "sizes": pipe.report.sizes,
           "transformer_kept": type(pipe.transformer).__name__}
    print("RESULT " + json.dumps(out, default=float), flush=True)


# ---- 3. sampling from outside, phases, projection ----------------------------------------------


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run_child(root: Path, work: Path, budget: str
              ) -> tuple[list[tuple[float, int]], dict[str, float], Any]:
    """(RSS samples (time, bytes), phase start times, the child's result)."""
    proc = subprocess.Popen([sys.executable, __file__, "--child", "--root", str(root),
                             "--work", str(work), "--max-memory", budget],
                            stdout=subprocess.PIPE, text=True)
    samples: list[tuple[float, int]] = []
    phases: dict[str, float] = {}  # the first time each mark was printed
    result: list[Any] = []

    def read() -> None:
        for line in proc.stdout:
            if line.startswith("PHASE "):
                _, name, t = line.split()
                if name in phases:  # a piece run again: its marks numbered from 2
                    name += f"#{sum(n.split('#')[0] == name for n in phases) + 1}"
                phases[name] = float(t)
            elif line.startswith("RESULT "):
                result.append(json.loads(line[len("RESULT "):]))
            print(line, end="", flush=True)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while proc.poll() is None:
        n = rss_bytes(proc.pid)
        if n is not None:
            samples.append((time.time(), n))
        time.sleep(0.2)
    reader.join()
    if proc.returncode:
        raise SystemExit(f"the child failed with exit code {proc.returncode}")
    return samples, phases, result[0]


def stage_times(work: Path) -> dict[str, Any]:
    manifest = json.loads((work / "manifest.json").read_text())
    stages = manifest["stages"]
    blocks = {k: v for k, v in stages.items() if k != "model"}
    double = [v["seconds"] for k, v in blocks.items() if k.startswith("transformer_blocks.")]
    single = [v["seconds"] for k, v in blocks.items() if k.startswith("single_")]
    return {
        "first_block_started": min(v["started"] for v in blocks.values()),
        "model_stage_started": stages["model"]["started"],
        "model_stage_s": stages["model"]["seconds"],
        "double_block_s_mean": sum(double) / len(double),
        "single_block_s_mean": sum(single) / len(single),
        "blocks": len(blocks),
    }


def pieces(samples: list[tuple[float, int]], phases: dict[str, float]) -> dict[str, Any]:
    """Seconds and peak RSS of generate's pieces: the prompts' encoding, the quantized
    transformer's load, the sampling, the decoding."""
    marks = [("encode", "encode_start#2", "encode_end#2"),
             ("load_quantized", "load_quantized_start", "load_quantized_end"),
             ("sample", "load_quantized_end", "decode_start"),
             ("decode", "decode_start", "decode_end")]
    return {name: {"seconds": phases[b] - phases[a], "peak_rss_gib": peak(samples, phases[a],
                                                                          phases[b])}
            for name, a, b in marks if a in phases and b in phases}


def peak(samples: list[tuple[float, int]], start: float, end: float) -> float:
    inside = [n for t, n in samples if start <= t < end]
    return max(inside, default=0) / GiB


def flops(n_img: int, n_txt: int) -> dict[str, float]:
    """Multiply-adds x 2 of one FLUX.1-dev transformer forward for one image (linears by the
    tokens each reads, attention's two products), from the inventory."""
    from pqjax.inventory import inventory
    from pqjax.models.flux import FluxConfig

    inv = inventory(FluxConfig(guidance_embeds=True))
    total, n = 0.0, n_img + n_txt
    for path, (d_in, d_out, _) in inv.linears.items():
        if (".norm" in path and path.endswith("linear")) or path.startswith(("time_text",
                                                                            "norm_out")):
            rows = 1  # AdaLN and the timestep MLPs read one vector per image
        elif path.startswith("context_embedder") or ".add_" in path or "to_add_out" in path \
                or "ff_context" in path:
            rows = n_txt
        elif path.startswith("single_"):
            rows = n
        else:
            rows = n_img
        total += 2.0 * rows * d_in * d_out
    blocks = 19 + 38
    attention = blocks * 4.0 * n * n * 3072
    return {"linear": total, "attention": attention, "forward": total + attention}


def cpu_matmul_gflops() -> float:
    """This machine's bf16 matmul throughput at a FLUX.1-dev MLP's shape (1536 tokens)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((1536, 3072), jnp.bfloat16)
    b = jnp.ones((3072, 12288), jnp.bfloat16)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    f(a, b).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(5):
        f(a, b).block_until_ready()
    return 5 * 2 * 1536 * 3072 * 12288 / (time.perf_counter() - t0) / 1e9


PROJECTED = ("load_encode_trajectories", "block_stages", "model_stage", "generate")
NVME_GBS = 7.0


def project(seconds: dict[str, float], cpu_gflops: float) -> dict[str, Any]:
    """Each measured phase on a GPU: its CPU seconds times this CPU's measured bf16 matmul
    throughput over the GPU's (MFU of its dense peak), plus, where the phase reads the
    full-precision weights block by block (the trajectories once per step, the block stages
    once), those bytes over the host link."""
    weights = 11.9e9 * 2  # bf16 bytes
    reads = {"load_encode_trajectories": STEPS, "block_stages": 1}
    out = {}
    for gpu, spec in GPUS.items():
        scale = cpu_gflops * 1e9 / (spec["tflops"] * 1e12 * MFU)
        phases = {k: seconds[k] * scale + reads.get(k, 0) * weights / (spec["pcie_gbs"] * 1e9)
                  for k in PROJECTED}
        quantize = sum(v for k, v in phases.items() if k != "generate")
        streamed = (STEPS + 1) * weights
        out[gpu] = {**{f"{k}_s": v for k, v in phases.items()}, "quantize_s": quantize,
                    "quantize_weights_from_nvme_s": quantize - streamed / (spec["pcie_gbs"] * 1e9)
                    + streamed / (NVME_GBS * 1e9)}
    return {"cpu_bf16_matmul_gflops": cpu_gflops, "mfu": MFU,
            "flops_per_image_forward": flops(SIZE * SIZE // 256, 512)["forward"],
            "gpus": out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", type=Path, default=Path("/tmp/flux-dev-random"))
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--keep", action="store_true", help="keep the pipeline folder")
    p.add_argument("--max-memory", default=BUDGET, help="the budget convert_and_quantize plans "
                   f"for (default {BUDGET}; rehearse with a small one to stream)")
    p.add_argument("--rehearse", action="store_true",
                   help="narrow two-block components; print the table, write no results")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    work = args.work or args.root.with_name(args.root.name + "-work")
    if args.child:
        return child(args.root, work, args.max_memory)
    disk_free = shutil.disk_usage(args.root.parent).free
    if (args.root / "written.json").is_file():  # a folder an earlier run kept: free before it
        written = json.loads((args.root / "written.json").read_text())
        disk_free += written["bytes"]
    else:
        written = write_folder(args.root, args.rehearse)
    cpu_gflops = cpu_matmul_gflops()
    samples, phases, result = run_child(args.root, work, args.max_memory)
    stages = stage_times(work)
    work_bytes = folder_bytes(work)
    t_q, t_g, t_end = phases["quantize"], phases["generate"], phases["done"]
    payload = {
        "setting": {"model": "FLUX.1-dev architecture, random weights", "format": "W4A4 NVFP4",
                    "method": "permuquant", "prompts": len(PROMPTS), "size": SIZE,
                    "steps": STEPS, "max_memory": args.max_memory},
        "peak_rss_gib_quantize": peak(samples, t_q, t_g),
        "peak_rss_gib_generate": peak(samples, t_g, t_end + 1),
        "peak_rss_gib_trajectories": peak(samples, t_q, stages["first_block_started"]),
        "peak_rss_gib_block_stages": peak(samples, stages["first_block_started"],
                                          stages["model_stage_started"]),
        "peak_rss_gib_model_stage": peak(samples, stages["model_stage_started"], t_g),
        "generate_pieces": pieces(samples, phases),
        "seconds": {"write_folder": written["seconds"], "quantize": t_g - t_q,
                    "load_encode_trajectories": stages["first_block_started"] - t_q,
                    "block_stages": stages["model_stage_started"]
                    - stages["first_block_started"],
                    "model_stage": stages["model_stage_s"], "generate": t_end - t_g,
                    "double_block_mean": stages["double_block_s_mean"],
                    "single_block_mean": stages["single_block_s_mean"]},
        "folder_gib": written["bytes"] / GiB,
        "work_folder_gib": work_bytes / GiB,
        "disk_free_gib_before": disk_free / GiB,
        "result": result,
        "blocks": stages["blocks"],
        "samples": len(samples),
    }
    payload["projection"] = project(payload["seconds"], cpu_gflops)
    if not args.rehearse:
        write_results("flux_full_scale", payload, markdown(payload))
    print(markdown(payload))
    if not args.keep:
        shutil.rmtree(args.root, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)


def markdown(r: dict[str, Any]) -> str:
    s = r["seconds"]
    lines = [
        f"{r['setting']['model']}; {r['setting']['format']} {r['setting']['method']}; "
        f"{r['setting']['prompts']} prompts at {r['setting']['size']}x{r['setting']['size']}, "
        f"{r['setting']['steps']} steps; max_memory {r['setting']['max_memory']}. Pipeline "
        f"folder {r['folder_gib']:.1f} GiB, work folder {r['work_folder_gib']:.1f} GiB.",
        "",
        "| phase | seconds | peak RSS (GiB, sampled from outside) |",
        "|---|---|---|",
        f"| write the random pipeline folder | {s['write_folder'] or 0:.0f} | - |",
        f"| load, encode prompts (T5, released), trajectories block by block | "
        f"{s['load_encode_trajectories']:.0f} | {r['peak_rss_gib_trajectories']:.2f} |",
        f"| block stages ({r['blocks']} blocks: calibrate, search, quantize) | "
        f"{s['block_stages']:.0f} | "
        f"{r['peak_rss_gib_block_stages']:.2f} |",
        f"| model stage (the temb site: every AdaLN linear) | {s['model_stage']:.0f} | "
        f"{r['peak_rss_gib_model_stage']:.2f} |",
        f"| **quantize (convert_and_quantize, all of the above)** | {s['quantize']:.0f} | "
        f"**{r['peak_rss_gib_quantize']:.2f}** |",
        f"| **generate (1 image, {r['setting']['steps']} steps)** | {s['generate']:.0f} | "
        f"**{r['peak_rss_gib_generate']:.2f}** |",
        "",
        f"Mean block stage: double {s['double_block_mean']:.1f} s, single "
        f"{s['single_block_mean']:.1f} s.",
        "",
        "Generate's pieces: " + ", ".join(
            f"{k} {v['seconds']:.0f} s, {v['peak_rss_gib']:.2f} GiB"
            for k, v in r["generate_pieces"].items()) + ".",
        "",
        f"Projection: each phase's CPU seconds times this CPU's bf16 matmul throughput "
        f"({r['projection']['cpu_bf16_matmul_gflops']:.0f} GFLOP/s, measured in the run) over "
        f"the GPU's at {r['projection']['mfu']:.0%} of its dense bf16 peak, plus the "
        "full-precision weights read block by block (once per trajectory step, once for the "
        "block stages) over PCIe 5 x16 (55 GB/s, the checkpoint in the host's page cache):",
        "",
        "| GPU | trajectories s | block stages s | model stage s | quantize s | generate s | "
        "quantize, weights from NVMe s |",
        "|---|---|---|---|---|---|---|",
    ]
    for gpu, g in r["projection"]["gpus"].items():
        lines.append(f"| {gpu} | {g['load_encode_trajectories_s']:.1f} | "
                     f"{g['block_stages_s']:.1f} | {g['model_stage_s']:.1f} | "
                     f"{g['quantize_s']:.1f} | {g['generate_s']:.1f} | "
                     f"{g['quantize_weights_from_nvme_s']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
