"""PermuQuant's calibration + search cost on one full-width FLUX double block, against RTN.

    .venv/bin/python benchmarks/permute_cpu.py            # hidden 3072, 4096 + 512 tokens
    .venv/bin/python benchmarks/permute_cpu.py --quick    # hidden 768, 1024 + 128 tokens

One FLUX.1 double block with random weights whose input channels have heavy-tailed scales
(lognormal, sigma 1), inputs with heavy-tailed channel scales, 8 calibration samples. Both
paths start from the same full-precision block; RTN quantizes every Linear directly, PermuQuant
calibrates (observers over the 8 samples), searches every site, absorbs and quantizes. Times
are measured after a warm-up run of each (compilation excluded), in the same process.
Then the search alone at every site of the block, on the same calibration rows: the sorted
order (the paper's criterion) against the sorted order refined by `REFINE_ROUNDS` rounds of
greedy swaps between groups (`permute.refine`, the search of `permuquant_hr`), each timed after
a warm-up call. Writes benchmarks/results/permute_cpu.{json,md}.

    .venv/bin/python benchmarks/permute_cpu.py --smoothed  # permuquant_hs's search per site

`--smoothed` times only the searches, per site of the same block: PermuQuant-H's joint
(rotation, order) choice, and permuquant_hs's (that choice under no scale and each of its
smoothing strengths); writes benchmarks/results/permute_cpu_hs.{json,md}.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_results
from pqjax import permute, rotate
from pqjax.baselines.hadamard import SMOOTH_ALPHAS
from pqjax.baselines.smooth_search import smoothed_search
from pqjax.calibrate import calibrate, linears
from pqjax.engine.calibration import Blockwise
from pqjax.engine.stages import Block, Stages
from pqjax.layers import QuantLinear
from pqjax.methods import method_spec
from pqjax.models.embeddings import rope_cos_sin
from pqjax.models.family import family
from pqjax.models.flux import FluxConfig, FluxTransformer2DModel
from pqjax.quantize import QuantConfig, apply_plan, set_module


def heavy_tailed_block(cfg: FluxConfig, seed: int) -> nnx.Module:
    """Block 0 of an abstract FLUX, filled on the host: kernel rows scaled by lognormal(0, 1)."""
    model = nnx.eval_shape(lambda: FluxTransformer2DModel(cfg, rngs=nnx.Rngs(0)))
    block = model.transformer_blocks[0]
    graphdef, state = nnx.split(block)
    rng = np.random.default_rng(seed)

    def fill(leaf):
        shape = leaf.shape
        w = rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[0])
        if len(shape) == 2:  # Linear kernel (d_in, d_out): heavy-tailed input-channel scales
            w *= np.exp(rng.standard_normal((shape[0], 1))).astype(np.float32)
        return jnp.asarray(w * 0.1 if len(shape) == 1 else w)

    return nnx.merge(graphdef, jax.tree.map(fill, state)), model


def calibration_cache(cfg: FluxConfig, n_img: int, n_txt: int, samples: int, seed: int):
    rng = np.random.default_rng(seed)
    d = cfg.inner_dim
    scale = np.exp(rng.standard_normal(d)).astype(np.float32)  # heavy-tailed channel scales
    side = int(np.sqrt(n_img))
    rows, cols = np.meshgrid(np.arange(side), np.arange(n_img // side), indexing="ij")
    img_ids = np.stack([np.zeros(n_img), rows.ravel(), cols.ravel()], -1)
    ids = jnp.asarray(np.concatenate([np.zeros((n_txt, 3)), img_ids]), jnp.float32)
    rope = rope_cos_sin(ids, cfg.axes_dims_rope, 10000.0)
    return [
        (rng.standard_normal((1, n_img, d), dtype=np.float32) * scale,
         rng.standard_normal((1, n_txt, d), dtype=np.float32) * scale,
         rng.standard_normal((1, d), dtype=np.float32), rope)
        for _ in range(samples)
    ]


def plain_rtn(block, config: QuantConfig) -> float:
    """Quantize every Linear of the block directly: no calibration, no search."""
    t0 = time.perf_counter()
    q = nnx.clone(block)
    for path, lin in linears(q):
        set_module(q, path, QuantLinear.from_linear(lin, weights=config.weight_format(),
                                                    acts=config.act_format()))
    jax.block_until_ready(nnx.state(q))
    return time.perf_counter() - t0


def run(method: str, block, model, cache, n_rows: int) -> tuple[float, dict]:
    """One block stage of the engine (`pqjax.engine.run`): calibrate the block on its cached
    inputs, the method on the block's sites, the plan applied. The block's AdaLN linears read
    temb, a site spanning blocks, so the engine quantizes them in its model stage, not here."""
    config = QuantConfig(weights="nvfp4", acts="nvfp4", method=method)
    stages = Stages.of(model, config)
    first = Block("transformer_blocks.0", "transformer_blocks", 0)
    fam = family("flux")
    carries = [{"x": x, "context": c, "temb": t, "rope": rope} for x, c, t, rope in cache]
    t0 = time.perf_counter()
    stats = Blockwise(fam.runner, fam.block_lists, carries, n_rows=n_rows)
    stats.resume(carries, first.list_name)
    calib = stats.block(first, block)
    targets = stages.block_targets(first)
    plan = method_spec(method)(block, calib, config, targets, stages.block_sites[first.name])
    q = apply_plan(plan, calib, config, targets)
    jax.block_until_ready(nnx.state(q))
    return time.perf_counter() - t0, {"report_layers": plan.layers, "report_sites": plan.sites}


REFINE_ROUNDS = 8


def _timed(fn):
    fn()  # warm-up: compile
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def block_sites(block, model, cache, n_rows: int):
    """(site, consumers in the block, the first consumer's calibration stats, the consumers'
    kernels) for every site of the block, calibrated once on the cached samples."""
    head = "transformer_blocks.0."
    calib = calibrate(
        block,
        [dict(x=jnp.asarray(c[0]), context=jnp.asarray(c[1]), temb=jnp.asarray(c[2]), rope=c[3])
         for c in cache],
        n_rows=n_rows, progress=False,
        forward=lambda blk, x, context, temb, rope: blk(x, context, temb, rope),
    )
    for site in permute.sites(model):
        if site.name.startswith(head):
            consumers = [c[len(head):] for c in site.consumers]
            kernels = [permute.module_at(block, c).kernel[...] for c in consumers]
            yield site, consumers, calib[consumers[0]], kernels


def search_cost(block, model, cache, n_rows: int) -> dict[str, dict]:
    """Per site of the block: seconds and relative error of the sorted order and of the sorted
    order refined (`REFINE_ROUNDS` rounds), both searched on the same calibration rows."""
    out = {}
    for site, consumers, stats, kernels in block_sites(block, model, cache, n_rows):
        row = {"dim": site.dim, "consumers": len(consumers)}
        search = functools.partial(
            permute.search, stats.rows, kernels, weights="nvfp4", acts="nvfp4",
            segments=site.segments, act_mean_sq=stats.mean_sq, act_absmax=stats.absmax)
        for label, rounds, order in (("sorted", 0, "joint_second_moment"),
                                     ("refined", REFINE_ROUNDS, "refine")):
            seconds, res = _timed(functools.partial(search, refine=rounds))
            err = {name: e for _, name, _, e, _ in res.table}
            row[label] = {"seconds": seconds, "err_identity": res.err_identity,
                          "err_order": err[order]}
        out[site.name] = row
        print(site.name, row)
    return out


def smoothed_cost(block, model, cache, n_rows: int) -> dict[str, dict]:
    """Per site of the block: seconds and final calibration error of PermuQuant-H's joint
    choice and of permuquant_hs's (the joint choice under no scale and each strength of
    `SMOOTH_ALPHAS`, where the site is scalable), each timed after a warm-up call."""

    def final(res):
        return res.err_permuted if res.accepted else res.err_identity

    out = {}
    for site, consumers, stats, kernels in block_sites(block, model, cache, n_rows):
        kw = dict(weights="nvfp4", acts="nvfp4", segments=site.segments,
                  act_mean_sq=stats.mean_sq, act_absmax=stats.absmax,
                  rotate=rotate.candidates(16, site.dim))

        def joint_choices(strengths, rows=stats.rows, kernels=kernels, kw=kw):
            return [(a, *smoothed_search(rows, kernels, a, **kw)) for a in strengths]

        strengths = (None, *SMOOTH_ALPHAS) if site.scalable else (None,)
        t_joint, [(_, _, res)] = _timed(functools.partial(joint_choices, (None,)))
        t_hs, found = _timed(functools.partial(joint_choices, strengths))
        best = min(found, key=lambda f: final(f[2]))
        row = {"dim": site.dim, "consumers": len(consumers), "scalable": site.scalable,
               "err_identity": res.err_identity,
               "joint": {"seconds": t_joint, "err": final(res)},
               "smoothed": {"seconds": t_hs, "err": final(best[2]), "strength": best[0]}}
        out[site.name] = row
        print(site.name, row, flush=True)
    return out


def _site_table(intro: str, columns: list[str], rows: list[list[str]],
                whole: tuple[str, float, str, float]) -> str:
    """A markdown table of per-site cells under `intro`, then the whole block's two totals
    (label, seconds, label, seconds) and their ratio."""
    lines = [intro, "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    a, ta, b, tb = whole
    lines += ["", f"Whole block: {a} {ta:.1f} s, {b} {tb:.1f} s (**{tb / ta:.1f}x**)."]
    return "\n".join(lines)


def smoothed_table(cost: dict[str, dict]) -> str:
    rows = [[name, str(r["dim"]), f"{r['err_identity']:.5f}", f"{a['seconds']:.2f}",
             f"{a['err']:.5f}", f"{b['seconds']:.2f}", f"{b['err']:.5f}", str(b["strength"]),
             f"{b['seconds'] / a['seconds']:.1f}x"]
            for name, r in cost.items() for a, b in [(r["joint"], r["smoothed"])]]
    return _site_table(
        "Search alone per site (NVFP4 W4A4, relative error on the calibration rows, rotation "
        "candidates `rotate.candidates(16, width)`; the smoothed search does not check each "
        "consumer against RTN on its own rows, as the method then does):",
        ["site", "width", "identity error", "joint: s", "joint error", "smoothed: s",
         "smoothed error", "strength", "time ratio"], rows,
        ("joint", sum(r["joint"]["seconds"] for r in cost.values()),
         "smoothed", sum(r["smoothed"]["seconds"] for r in cost.values())))


def search_table(cost: dict[str, dict]) -> str:
    rows = [[name, str(r["dim"]), f"{a['err_identity']:.5f}", f"{a['seconds']:.2f}",
             f"{a['err_order']:.5f}", f"{b['seconds']:.2f}", f"{b['err_order']:.5f}",
             f"{b['seconds'] / a['seconds']:.1f}x"]
            for name, r in cost.items() for a, b in [(r["sorted"], r["refined"])]]
    return _site_table(
        f"Search alone per site (NVFP4 W4A4, relative error on the calibration rows; refine: "
        f"{REFINE_ROUNDS} rounds of swaps between groups from the sorted order):",
        ["site", "width", "identity error", "sorted: s", "sorted error", "refined: s",
         "refined error", "refine time ratio"], rows,
        ("sorted", sum(r["sorted"]["seconds"] for r in cost.values()),
         "refined", sum(r["refined"]["seconds"] for r in cost.values())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--smoothed", action="store_true",
                        help="only permuquant_hs's search against PermuQuant-H's, per site")
    args = parser.parse_args()
    heads, n_img, n_txt = (6, 1024, 128) if args.quick else (24, 4096, 512)
    cfg = FluxConfig(num_layers=1, num_single_layers=0, num_attention_heads=heads,
                     guidance_embeds=True)
    block, model = heavy_tailed_block(cfg, seed=0)
    cache = calibration_cache(cfg, n_img, n_txt, samples=8, seed=1)
    if args.smoothed:
        cost = smoothed_cost(block, model, cache, 256)
        table = (f"One FLUX.1 double block (hidden {cfg.inner_dim}, {n_img} image + {n_txt} "
                 "text tokens, 8 samples, 256 rows per layer), float32 on CPU, compilation "
                 "excluded.\n\n" + smoothed_table(cost))
        print(table)
        name = "permute_cpu_hs_quick" if args.quick else "permute_cpu_hs"
        write_results(name, {"config": {"hidden": cfg.inner_dim, "n_img": n_img,
                                        "n_txt": n_txt, "samples": 8,
                                        "strengths": SMOOTH_ALPHAS},
                             "search_per_site": cost}, table)
        return
    config = QuantConfig(weights="nvfp4", acts="nvfp4")
    plain_rtn(block, config)  # warm-up
    results = {"rtn_plain": {"seconds": plain_rtn(block, config)}}
    for method in ("rtn", "permuquant"):
        run(method, block, model, cache, 256)  # warm-up: compile every shape once
        seconds, entry = run(method, block, model, cache, 256)
        rows = entry["report_layers"].values()
        results[method] = {
            "seconds": seconds,
            "mean_layer_error": float(np.mean([r["err"] for r in rows])),
            "sites_accepted": sum(bool(s.get("accepted")) for s in entry["report_sites"].values()),
            "n_sites": len(entry["report_sites"]),
            "sites": {
                name: {k: site[k] for k in ("accepted", "err_identity", "err_permuted")
                       if k in site}
                for name, site in entry["report_sites"].items()
            },
        }
        print(method, results[method])
    p, r, plain = results["permuquant"], results["rtn"], results["rtn_plain"]
    ratio = p["seconds"] / plain["seconds"]
    table = (
        "| path | seconds | mean layer error | sites accepted |\n|---|---|---|---|\n"
        f"| RTN, weights only (no calibration) | {plain['seconds']:.2f} | – | – |\n"
        f"| RTN with calibration (8 samples) | {r['seconds']:.1f} | "
        f"{r['mean_layer_error']:.4f} | – |\n"
        f"| PermuQuant: calibration + search + absorb + quantize | {p['seconds']:.1f} | "
        f"{p['mean_layer_error']:.4f} | {p['sites_accepted']}/{p['n_sites']} |\n\n"
        f"PermuQuant / plain RTN time: **{ratio:.1f}x**; PermuQuant / calibrated RTN: "
        f"**{p['seconds'] / r['seconds']:.2f}x**. One FLUX.1 double block (hidden "
        f"{cfg.inner_dim}, {n_img} image + {n_txt} text tokens), NVFP4 W4A4, float32 on CPU, "
        "compilation excluded (each path warmed up first)."
    )
    cost = search_cost(block, model, cache, 256)
    table += "\n\n" + search_table(cost)
    print(table)
    name = "permute_cpu_quick" if args.quick else "permute_cpu"
    write_results(name, {"config": {"hidden": cfg.inner_dim, "n_img": n_img, "n_txt": n_txt,
                                    "samples": 8, "refine_rounds": REFINE_ROUNDS},
                         "results": results, "search_per_site": cost,
                         "ratio_permuquant_over_plain_rtn": ratio}, table)


if __name__ == "__main__":
    main()
