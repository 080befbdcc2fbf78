"""Every PTQ method on the same model, calibration data and formats: the comparison table.

    .venv/bin/python benchmarks/compare_methods.py            # all methods x 3 formats
    .venv/bin/python benchmarks/compare_methods.py --methods rtn,permuquant --per-digit 2
    .venv/bin/python benchmarks/compare_methods.py --methods permuquant,hadamard,permuquant_h,\
        permuquant_hs --name compare_hs          # a subset, into results/compare_hs.*

On the embedded trained tiny FLUX: one calibration (the model's own trajectories for its
calibration prompts) shared by every method; W4A4 NVFP4, W4A4 INT4 g64, W3A3 INT3 g64, and
W2A3 (INT2 weights, INT3 activations, g64), the harder setting where the classifier's accuracy
drops below 1 and the methods separate; the same evaluation prompts and seeds for every run.
Columns follow the paper's where they apply: PSNR and SSIM against full precision (means over
images with Student-t 95% intervals), classifier accuracy, Frechet distance of classifier
features against real digits, mean layer error, quantization time. Under each table,
PermuQuant-H against PermuQuant and Hadamard (PermuQuant-HS against the three): the mean
per-image PSNR difference on the same seeds, with its paired 95% interval. QuaRTZ is a 4-bit
format, so it runs in the W4A4 settings only. Writes benchmarks/results/compare_methods.{json,md}
and the image grids under benchmarks/results/compare_methods/ (--name: another name).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.common import RESULTS, write_results
from pqjax.api import calibrate_pipeline
from pqjax.baselines.quartz import quartz_config
from pqjax.eval.compare import EvalSpec, compare
from pqjax.eval.metrics import DigitMetrics, mean_ci
from pqjax.methods import method_names
from pqjax.pipelines.load import load_pipeline
from pqjax.quantize import QuantConfig

# (title, weights, acts, group)
SETTINGS = (("W4A4 NVFP4", "nvfp4", "nvfp4", None), ("W4A4 INT4 g64", "int4", "int4", 64),
            ("W3A3 INT3 g64", "int3", "int3", 64), ("W2A3 INT2/INT3 g64", "int2", "int3", 64))
ORDER = ("rtn", "smoothquant", "ptq4dit", "omniquant_lwc", "gptq", "svdquant", "hadamard",
         "convrot", "quartz", "permuquant", "permuquant_gptq", "permuquant_h", "permuquant_hr",
         "permuquant_hs")


def configs_for(setting: tuple, methods: list[str]) -> list[QuantConfig]:
    title, weights, acts, group = setting
    out = []
    for m in methods:
        if m == "quartz":
            if title.startswith("W4A4"):  # QuaRTZ is a 4-bit scheme, in its own 4-bit format
                out.append(quartz_config(QuantConfig(weights=weights, acts=acts)))
            continue
        out.append(QuantConfig(weights=weights, acts=acts, group=group, method=m))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(m for m in ORDER if m in method_names()))
    parser.add_argument("--per-digit", type=int, default=5)
    parser.add_argument("--name", default="compare_methods",
                        help="results name: benchmarks/results/<name>.{json,md} and <name>/")
    args = parser.parse_args()
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(method_names()))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; available: {method_names()}")
    fp = load_pipeline()
    calib = calibrate_pipeline(fp, n_rows=256, track_batches=64, progress=True)
    metrics = DigitMetrics()
    spec = EvalSpec.digits(per_digit=args.per_digit)
    tables, everything = [], {}
    for setting in SETTINGS:
        # results/compare_methods/<format>/, or <WxAy>/ where weights and acts differ
        folder = setting[1] if setting[1] == setting[2] else setting[0].split()[0].lower()
        runs = compare(fp, calib, configs_for(setting, methods), spec,
                       RESULTS / args.name / folder, digit_metrics=metrics)
        everything[setting[0]] = runs
        tables.append(table(setting[0], runs))
    date = datetime.date.today().isoformat()
    cmd = "`.venv/bin/python benchmarks/compare_methods.py" + (
        "" if args.methods == parser.get_default("methods") else f" --methods {args.methods}") + (
        "" if args.name == parser.get_default("name") else f" --name {args.name}") + "`"
    md = (f"Made {date} with {cmd} on the embedded tiny FLUX ({len(spec.prompts)} images per "
          "run, same seeds).\n\n" + "\n\n".join(tables))
    print(md)
    write_results(args.name, {"runs": everything}, md)


def table(title: str, runs: dict) -> str:
    fp = runs["full_precision"]
    lines = [f"**{title}**", "",
             "| method | PSNR vs FP (dB) ↑ | SSIM vs FP ↑ | accuracy ↑ | Fréchet ↓ | "
             "mean layer error ↓ | quantize s |", "|---|---|---|---|---|---|---|",
             f"| full precision | ∞ | 1 | {fp['accuracy']:.3f} | {fp['frechet']:.2f} | – | – |"]
    rows = [(name, r) for name, r in runs.items() if name != "full_precision"]
    best_psnr = max(r["psnr_vs_fp"] for _, r in rows)
    for _, r in rows:
        mark = "**" if r["psnr_vs_fp"] == best_psnr else ""
        lines.append(f"| {r['method']} | {mark}{r['psnr_vs_fp']:.2f} ± {r['psnr_ci95']:.2f}{mark}"
                     f" | {r['ssim_vs_fp']:.4f} ± {r['ssim_ci95']:.4f} | {r['accuracy']:.3f} |"
                     f" {r['frechet']:.2f} | {r['mean_layer_error']:.4f} | "
                     f"{r['quantize_seconds']:.1f} |")
    by_method = {r["method"]: r for _, r in rows}
    pairs = [(m, other) for m in ("permuquant_h", "permuquant_hs") if m in by_method
             for other in ("permuquant", "hadamard", "permuquant_h")
             if other in by_method and other != m]
    if pairs:
        lines += ["", *(paired_line(by_method[m], by_method[o]) for m, o in pairs)]
    return "\n".join(lines)


def paired_line(a: dict, b: dict) -> str:
    """`a` against `b` on the same seeds: the mean per-image PSNR difference, its paired 95%
    interval, and the verdict (worse only where the whole interval is below zero)."""
    diff, ci = mean_ci(np.subtract(a["psnr_per_image"], b["psnr_per_image"]))
    return (f"- {a['method']} − {b['method']}: {diff:+.2f} ± {ci:.2f} dB per image "
            f"(paired, {len(a['psnr_per_image'])} images): {verdict(diff, ci)}")


def verdict(diff: float, ci: float, same: str = "not distinguishable") -> str:
    """A mean difference and its interval's half-width -> "better", "**worse**" (the whole
    interval above / below zero) or `same`."""
    return "better" if diff - ci > 0 else "**worse**" if diff + ci < 0 else same


if __name__ == "__main__":
    main()
