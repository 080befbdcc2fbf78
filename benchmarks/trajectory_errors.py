"""Which error predicts the images: a layer's, one denoising step's, or the whole trajectory's?

    .venv/bin/python benchmarks/trajectory_errors.py                  # ~7 min on 2 cores
    .venv/bin/python benchmarks/trajectory_errors.py --seeds 1 --settings nvfp4 \
        --methods permuquant,permuquant_h --name trajectory_errors_seed1

The methods choose orders and rotations by each layer's relative output error on calibration
rows. What the user sees is the image at the end of a sampling loop, where every step's error
feeds the next step's input. On the embedded tiny FLUX, per calibration draw (as
benchmarks/calib_draws.py) and per method, four errors against full precision on the same
evaluation prompts and seeds:

- layer: the mean per-layer relative error on calibration rows (what the search minimizes);
- one step: ||v_q(x_t) - v(x_t)|| / ||v(x_t)|| on the full-precision trajectory x_t (teacher
  forced), the mean over images and steps;
- open loop: ||sum_t dt * (v_q - v)(x_t)|| / ||z||, the final latent error if no step's
  error fed the next (z: the full-precision final latent);
- closed loop: ||z_q - z|| / ||z||, each model sampling on its own,

and the images' PSNR against full precision. Under each table: Spearman's rank correlation of
each error with -PSNR over every (draw, method) row; a plot of one-step against closed-loop
error. Writes benchmarks/results/<name>.{json,md,png} (--name, default trajectory_errors).
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.calib_draws import KEYS, draw_parser, parse_draw_args
from benchmarks.common import RESULTS, write_results
from benchmarks.compare_methods import SETTINGS, configs_for

METHODS = ("rtn", "permuquant", "hadamard", "permuquant_h", "permuquant_hs")
ERRORS = ("layer", "one_step", "open_loop", "closed_loop")


def parse_args(argv: list[str] | None = None):
    parser = draw_parser(__doc__.splitlines()[0], default_name="trajectory_errors",
                         methods=METHODS)
    return parse_draw_args(parser, argv)


def norms(x: np.ndarray) -> np.ndarray:
    """Per image ||x|| over every axis but the first, in float64."""
    x = np.asarray(x, np.float64)
    return np.linalg.norm(x.reshape(len(x), -1), axis=1)


def relative(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per image ||a - b|| / ||b|| over every axis but the first."""
    return norms(np.asarray(a, np.float64) - np.asarray(b, np.float64)) / norms(b)


class Reference:
    """The full-precision side, computed once per evaluation: the trajectory's transformer
    inputs and velocities, the step sizes, the final latents and the images."""

    def __init__(self, fp, spec):
        from flax import nnx

        self.prompts = list(spec.prompts)
        self.seed = spec.seed
        self.batches = fp.calibration_batches(self.prompts, seed=spec.seed)
        self.forward = nnx.jit(lambda m, batch: m(**batch))
        self.v = [np.asarray(self.forward(fp.transformer, b)) for b in self.batches]
        tokens = self.batches[0]["hidden_states"].shape[1]
        sigmas = np.asarray(fp.scheduler.sigmas(len(self.batches), image_seq_len=tokens))
        self.dt = np.diff(sigmas)[: len(self.batches)]
        self.latents = np.asarray(fp.sample_latents(self.prompts, seed=spec.seed))
        self.images = np.asarray(fp.decoder.decode(self.latents))

    def errors(self, q) -> dict[str, float]:
        """one_step, open_loop, closed_loop and psnr of the quantized pipeline `q`."""
        from pqjax.eval.metrics import psnr_per_image

        one, drift = [], 0.0
        for batch, v, dt in zip(self.batches, self.v, self.dt):
            vq = np.asarray(self.forward(q.transformer, batch), np.float64)
            one.append(relative(vq, v).mean())
            drift = drift + dt * (vq - v)
        latents = np.asarray(q.sample_latents(self.prompts, seed=self.seed))
        images = np.asarray(q.decoder.decode(latents))
        open_loop = norms(drift) / norms(self.latents)
        return {"one_step": float(np.mean(one)), "open_loop": float(open_loop.mean()),
                "closed_loop": float(relative(latents, self.latents).mean()),
                "psnr": float(psnr_per_image(images, self.images).mean())}


def spearman(x: list[float], y: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def tables(rows: list[dict]) -> str:
    lines = []
    for title in dict.fromkeys(r["setting"] for r in rows):
        mine = [r for r in rows if r["setting"] == title]
        lines += [f"**{title}**", "",
                  "| draw | method | layer | one step | open loop | closed loop | PSNR (dB) |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['seed']} | {r['method']} | {r['layer']:.4f} | {r['one_step']:.4f} | "
                  f"{r['open_loop']:.4f} | {r['closed_loop']:.4f} | {r['psnr']:.2f} |"
                  for r in mine]
        rho = {e: spearman([r[e] for r in mine], [-r["psnr"] for r in mine]) for e in ERRORS}
        lines += ["", "Spearman's rank correlation with -PSNR over these "
                  f"{len(mine)} rows: " + ", ".join(f"{e.replace('_', ' ')} {v:+.2f}"
                                                      for e, v in rho.items()), ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    from pqjax.eval.plots import pyplot

    plt = pyplot()
    titles = list(dict.fromkeys(r["setting"] for r in rows))
    fig, axes = plt.subplots(1, len(titles), figsize=(5 * len(titles), 4.2), squeeze=False)
    for ax, title in zip(axes[0], titles):
        for m in dict.fromkeys(r["method"] for r in rows):
            pts = [(r["one_step"], r["closed_loop"]) for r in rows
                   if r["setting"] == title and r["method"] == m]
            ax.scatter(*zip(*pts), label=m)
        ax.set_xlabel("one-step velocity error (teacher forced)")
        ax.set_ylabel("closed-loop final latent error")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    from pqjax.api import calibrate_pipeline, quantize_pipeline
    from pqjax.eval.compare import EvalSpec
    from pqjax.pipelines.load import load_pipeline

    settings = [s for s in SETTINGS if s[0] in {KEYS[k] for k in args.settings}]
    fp = load_pipeline()
    ref = Reference(fp, EvalSpec.digits(per_digit=args.per_digit))
    rows = []
    for seed in args.seeds:
        calib = calibrate_pipeline(fp, n_rows=256, track_batches=64, seed=seed, progress=True)
        for setting in settings:
            for config in configs_for(setting, args.methods):
                q = quantize_pipeline(fp, calib, config)
                row = {"setting": setting[0], "seed": seed, "method": config.method,
                       "layer": float(q.report.summary["mean_err"]), **ref.errors(q)}
                print(row, flush=True)
                rows.append(row)
    command = " ".join([".venv/bin/python benchmarks/trajectory_errors.py", *sys.argv[1:]])
    md = (f"Made {datetime.date.today().isoformat()} with `{command}` on the embedded "
          f"tiny FLUX ({len(ref.prompts)} evaluation images, "
          f"{len(ref.batches)} steps; calibration draws {args.seeds}). Errors are relative "
          f"to full precision (see the module docstring); the plot is {args.name}.png.\n\n"
          + tables(rows))
    print(md)
    plot(rows, RESULTS / f"{args.name}.png")
    write_results(args.name, {"seeds": args.seeds, "rows": rows}, md)


if __name__ == "__main__":
    main()
