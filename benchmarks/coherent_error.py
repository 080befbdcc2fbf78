"""Where PermuQuant-H's extra image error at NVFP4 lives: the per-image mean (DC) of the final
latent, and the layers' mean output error that a bias correction removes.

    .venv/bin/python benchmarks/coherent_error.py                  # ~15 min on 2 cores
    .venv/bin/python benchmarks/coherent_error.py --seeds 0 --settings nvfp4 \
        --methods permuquant,permuquant_h --name coherent_error_seed0

benchmarks/trajectory_errors.py found that at NVFP4 the per-layer and one-step errors the
search minimizes do not rank the images; only the closed loop does. Here, per calibration draw
(as benchmarks/calib_draws.py) and method, on the embedded tiny FLUX's 50 evaluation images:

- closed loop: ||z_q - z|| / ||z|| of the final latents, as in trajectory_errors;
- DC share: the share of ||z_q - z||^2 that is one offset over the whole image (the per-image
  mean of z_q - z over every latent element), mean over images;
- PSNR of the images as deployed, and after a bias correction: each quantized Linear's bias
  minus its mean output error (quantized minus full precision) over calibration rows (Nagel
  et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias Correction", with
  data). The rows are those the layer reads in the plan's full-precision model (orders absorbed,
  recalibrated on the same trajectories), so the error is the deployed layer's, in its own
  channel order. Paired gain per image, and PermuQuant-H minus PermuQuant before and after.

The joint methods (permuquant_h, -hr, -hs) run with option bias_correction=False here, so
that "as deployed" is the choice alone; their default (True) deploys the same correction
(`pqjax.baselines.bias_correction`, on the same calibration rows), so their "PSNR corrected"
column is what permuquant_h gives by default.
Writes benchmarks/results/<name>.{json,md} (--name, default coherent_error).
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.calib_draws import KEYS, draw_parser, parse_draw_args
from benchmarks.common import write_results
from benchmarks.compare_methods import SETTINGS, configs_for
from benchmarks.trajectory_errors import norms, relative

METHODS = ("rtn", "permuquant", "hadamard", "permuquant_h")


def parse_args(argv: list[str] | None = None):
    parser = draw_parser(__doc__.splitlines()[0], default_name="coherent_error",
                         methods=METHODS)
    args = parse_draw_args(parser, argv)
    if "permuquant" not in args.methods:
        parser.error("--methods: needs permuquant (the pairs are against it)")
    return args


def uncorrected(config):
    """`config` with option bias_correction=False where its method has that option."""
    import dataclasses

    from pqjax.methods import method_spec

    if "bias_correction" not in method_spec(config.method).options:
        return config
    return dataclasses.replace(config, options=(*config.options, ("bias_correction", False)))


def dc_share(z_q: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Per image `(B,)`: the share of ||z_q - z||^2 in the image-wide mean of z_q - z."""
    d = (np.asarray(z_q, np.float64) - np.asarray(z, np.float64)).reshape(len(z), -1)
    return d.shape[1] * np.square(d.mean(axis=1)) / np.maximum(np.square(norms(d)), 1e-300)


def correct_biases(qmodel, fp_model, rows, targets: list[str]) -> int:
    """Subtract from each quantized target's bias its mean output error on `rows[path].rows`
    (inputs of `fp_model`, the plan's full-precision model); returns how many were corrected
    (a Linear without a bias is left alone)."""
    import jax.numpy as jnp

    from pqjax.models.paths import module_at

    done = 0
    for path in targets:
        q, f = module_at(qmodel, path), module_at(fp_model, path)
        if q.bias is None or path not in rows:
            continue
        x = jnp.asarray(rows[path].rows, q.dtype)
        err = np.asarray(q(x), np.float64) - np.asarray(f(x), np.float64)
        bias = q.bias[...]
        q.bias[...] = jnp.asarray(np.asarray(bias, np.float64) - err.mean(axis=0), bias.dtype)
        done += 1
    return done


def run_method(fp, ref, calib, batches, config, seed: int) -> dict:
    """One (draw, method): closed-loop error, DC share and per-image PSNR before and after
    the bias correction."""
    from flax import nnx

    from pqjax.calibrate import calibrate
    from pqjax.eval.metrics import psnr_per_image
    from pqjax.methods import get_method
    from pqjax.quantize import apply_plan, quantizable

    targets = quantizable(fp.transformer, config)
    plan = get_method(config.method)(fp.transformer, calib, config, targets)
    fp_model = nnx.clone(plan.model)  # apply_plan swaps the plan model's targets in place
    rows = calibrate(fp_model, batches, n_rows=256, seed=seed, progress=False,
                     forward=getattr(fp, "calibration_forward", None))
    qmodel = apply_plan(plan, calib, config, targets)

    def sample():
        q = fp.with_transformer(qmodel)
        z = np.asarray(q.sample_latents(ref.prompts, seed=ref.seed))
        return z, np.asarray(psnr_per_image(np.asarray(q.decoder.decode(z)), ref.images))

    z, psnr = sample()
    corrected = correct_biases(qmodel, fp_model, rows, targets)
    _, psnr_bc = sample()
    return {"closed_loop": float(relative(z, ref.latents).mean()),
            "dc_share": float(dc_share(z, ref.latents).mean()),
            "psnr": psnr.tolist(), "psnr_bc": psnr_bc.tolist(), "corrected": corrected}


def tables(rows: list[dict]) -> str:
    from pqjax.eval.metrics import mean_ci

    def ci(v) -> str:
        m, h = mean_ci(v)
        return f"{m:+.2f} ± {h:.2f}"

    lines = []
    for title in dict.fromkeys(r["setting"] for r in rows):
        mine = [r for r in rows if r["setting"] == title]
        pq = {r["seed"]: r for r in mine if r["method"] == "permuquant"}
        lines += [f"**{title}**", "",
                  "| draw | method | closed loop | DC share | PSNR (dB) | PSNR corrected | "
                  "correction gain | − permuquant | − permuquant, both corrected |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in mine:
            p, b = np.asarray(r["psnr"]), np.asarray(r["psnr_bc"])
            base = pq[r["seed"]]
            vs = ("–", "–") if r["method"] == "permuquant" else (
                ci(p - np.asarray(base["psnr"])), ci(b - np.asarray(base["psnr_bc"])))
            lines.append(f"| {r['seed']} | {r['method']} | {r['closed_loop']:.4f} | "
                         f"{r['dc_share']:.3f} | {p.mean():.2f} | {b.mean():.2f} | "
                         f"{ci(b - p)} | {vs[0]} | {vs[1]} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    from benchmarks.trajectory_errors import Reference
    from pqjax.api import calibrate_pipeline, default_calib_prompts
    from pqjax.eval.compare import EvalSpec
    from pqjax.pipelines.load import load_pipeline

    settings = [s for s in SETTINGS if s[0] in {KEYS[k] for k in args.settings}]
    methods = ["permuquant", *[m for m in args.methods if m != "permuquant"]]
    fp = load_pipeline()
    ref = Reference(fp, EvalSpec.digits(per_digit=args.per_digit))
    rows = []
    for seed in args.seeds:
        calib = calibrate_pipeline(fp, n_rows=256, track_batches=64, seed=seed, progress=True)
        batches = fp.calibration_batches(default_calib_prompts(fp), seed=seed)
        for setting in settings:
            for config in configs_for(setting, methods):
                row = {"setting": setting[0], "seed": seed, "method": config.method,
                       **run_method(fp, ref, calib, batches, uncorrected(config), seed)}
                print({k: v for k, v in row.items() if not k.startswith("psnr")}, flush=True)
                rows.append(row)
    command = " ".join([".venv/bin/python benchmarks/coherent_error.py", *sys.argv[1:]])
    md = (f"Made {datetime.date.today().isoformat()} with `{command}` on the embedded tiny "
          f"FLUX ({len(ref.prompts)} evaluation images; calibration draws {args.seeds}). "
          "Intervals: paired per image, 95% Student-t (see the module docstring).\n\n"
          + tables(rows))
    print(md)
    write_results(args.name, {"seeds": args.seeds, "rows": rows}, md)


if __name__ == "__main__":
    main()
