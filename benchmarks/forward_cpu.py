"""FLUX forward on CPU: jitted NNX model against diffusers' torch module, same weights, same run.

    .venv/bin/python benchmarks/forward_cpu.py            # mid-size config from the issue
    .venv/bin/python benchmarks/forward_cpu.py --quick    # small config, for a smoke run

Config: hidden 768 (6 heads x 128), 4 double + 4 single blocks, 1024 image + 128 text tokens,
batch 1, float32. Writes benchmarks/results/forward_cpu.{json,md}; ratio > 1 means JAX is
faster.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
import torch
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import convert
from benchmarks.common import timeit, write_results

MID = dict(
    num_layers=4,
    num_single_layers=4,
    attention_head_dim=128,
    num_attention_heads=6,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
    in_channels=64,
)
QUICK = dict(MID, num_layers=1, num_single_layers=1, joint_attention_dim=256)


def inputs(cfg: dict, n_img: int, n_txt: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    side = int(np.sqrt(n_img))
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(n_img // side), indexing="ij")
    return dict(
        hidden_states=torch.randn(1, n_img, cfg["in_channels"], generator=g),
        encoder_hidden_states=torch.randn(1, n_txt, cfg["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(1, cfg["pooled_projection_dim"], generator=g),
        timestep=torch.tensor([0.5]),
        img_ids=torch.stack([torch.zeros(n_img), rows.flatten(), cols.flatten()], -1).float(),
        txt_ids=torch.zeros(n_txt, 3),
        guidance=torch.tensor([3.5]),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cfg = QUICK if args.quick else MID
    n_img, n_txt = (256, 32) if args.quick else (1024, 128)

    torch.manual_seed(0)
    tmodel = __import__("diffusers").FluxTransformer2DModel(**cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        tmodel.save_pretrained(d)
        jmodel = convert.load_transformer(d)
    x = inputs(cfg, n_img, n_txt)
    jx = {k: jax.numpy.asarray(v.numpy()) for k, v in x.items()}

    graphdef, state = nnx.split(jmodel)

    @jax.jit
    def forward(state, batch):
        return nnx.merge(graphdef, state)(**batch)

    def run_jax():
        return forward(state, jx).block_until_ready()

    def run_torch():
        with torch.inference_mode():
            return tmodel(**x).sample

    ref = run_torch().numpy()
    err = float(np.abs(np.asarray(run_jax()) - ref).max() / np.abs(ref).max())
    t_torch = timeit(run_torch, repeats=args.repeats)
    t_jax = timeit(run_jax, repeats=args.repeats)
    ratio = t_torch["median_s"] / t_jax["median_s"]
    params = sum(p.numel() for p in tmodel.parameters())
    table = (
        "| implementation | median s | min s |\n|---|---|---|\n"
        f"| diffusers torch (CPU, {torch.get_num_threads()} threads) | "
        f"{t_torch['median_s']:.3f} | {t_torch['min_s']:.3f} |\n"
        f"| pqjax NNX, jax.jit | {t_jax['median_s']:.3f} | {t_jax['min_s']:.3f} |\n\n"
        f"Speed ratio torch/jax: **{ratio:.2f}x** (> 1: JAX faster). Config: {params / 1e6:.0f}M "
        f"params, {n_img} image + {n_txt} text tokens, float32; outputs agree to {err:.1e} "
        "of the output scale."
    )
    print(table)
    name = "forward_cpu_quick" if args.quick else "forward_cpu"
    write_results(
        name,
        {
            "config": cfg,
            "n_img": n_img,
            "n_txt": n_txt,
            "torch": t_torch,
            "jax": t_jax,
            "ratio_torch_over_jax": ratio,
            "rel_err": err,
        },
        table,
    )


if __name__ == "__main__":
    main()
