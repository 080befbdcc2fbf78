"""How much of a PSNR difference between two methods is the calibration draw?

    .venv/bin/python benchmarks/calib_draws.py                     # seeds 0,1,2; ~15 min
    .venv/bin/python benchmarks/calib_draws.py --seeds 0,1 --settings nvfp4
    .venv/bin/python benchmarks/calib_draws.py --settings nvfp4 --rotate-per-image auto \
        --name calib_draws_rpi_auto --against calib_draws   # permuquant_h's option, against

compare_methods' paired intervals are over evaluation images, for ONE calibration (the model's
own trajectories from noise seed 0). A quantized model is one draw: a different calibration
seed gives other calibration rows, so other statistics, orders and rotations, and every image
of the run shares that draw's errors. Here the same comparison runs once per calibration seed
(the same 50 evaluation images and seeds each time): per draw, PermuQuant-H against PermuQuant
and Hadamard (mean per-image difference and its paired 95% interval), then the mean of the
per-draw differences over draws with its Student-t interval over draws. With --against an
earlier run's name (same seeds, its settings a superset): permuquant_h here minus
permuquant_h there, paired per image, draw by draw (e.g. an option of permuquant_h against
its default). Writes benchmarks/results/<name>.{json,md} (the JSON with every run's
per-image PSNR) and the runs under benchmarks/results/<name>/seed<s>/<setting>/ (--name,
default calib_draws).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.common import RESULTS, write_results
from benchmarks.compare_methods import SETTINGS, configs_for, verdict
from pqjax.api import calibrate_pipeline
from pqjax.baselines.rotation_choice import JOINT_OPTIONS
from pqjax.eval.compare import EvalSpec, compare
from pqjax.eval.metrics import DigitMetrics, mean_ci
from pqjax.methods import method_names
from pqjax.pipelines.load import load_pipeline

METHODS = ("permuquant", "hadamard", "permuquant_h")
PAIRS = (("permuquant_h", "permuquant"), ("permuquant_h", "hadamard"))
KEYS = {"nvfp4": "W4A4 NVFP4", "int4": "W4A4 INT4 g64", "int3": "W3A3 INT3 g64",
        "w2a3": "W2A3 INT2/INT3 g64"}


def draw_parser(description: str, default_name: str, default_settings: str = "nvfp4,int4",
                methods: tuple[str, ...] | None = None) -> argparse.ArgumentParser:
    """The arguments of a benchmark run once per calibration draw (here,
    benchmarks/trajectory_errors.py and benchmarks/coherent_error.py): --seeds, --settings,
    --per-digit, --name, and with `methods` (its default) --methods."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seeds", default="0,1,2", help="calibration seeds, comma-separated")
    parser.add_argument("--settings", default=default_settings, help=f"subset of {sorted(KEYS)}")
    parser.add_argument("--per-digit", type=int, default=5)
    parser.add_argument("--name", default=default_name, help="results name")
    if methods is not None:
        parser.add_argument("--methods", default=",".join(methods), help="comma-separated")
    return parser


def parse_draw_args(parser: argparse.ArgumentParser,
                    argv: list[str] | None = None) -> argparse.Namespace:
    """Parse, then check --seeds and --settings: a bad value is named before any work."""
    args = parser.parse_args(argv)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds: integers separated by commas, got {args.seeds!r}")
    args.settings = args.settings.split(",")
    unknown = sorted(set(args.settings) - set(KEYS))
    if unknown:
        parser.error(f"--settings: unknown {unknown}; choose from {sorted(KEYS)}")
    if hasattr(args, "methods"):
        args.methods = args.methods.split(",")
        unknown = sorted(set(args.methods) - set(method_names()))
        if unknown:
            parser.error(f"--methods: unknown {unknown}; choose from {sorted(method_names())}")
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = draw_parser(__doc__.splitlines()[0], default_name="calib_draws")
    option = JOINT_OPTIONS["rotate_per_image"]
    parser.add_argument("--rotate-per-image", default=option.default, choices=option.choices,
                        help="permuquant_h's option rotate_per_image (default: its default)")
    parser.add_argument("--against", default=None,
                        help="an earlier run's name: permuquant_h here minus there, per image")
    args = parse_draw_args(parser, argv)
    if args.against is not None:
        try:
            args.against_runs = load_per_image(args.against, args.seeds, args.settings)
        except ValueError as e:
            parser.error(f"--against: {e}")
    return args


def load_per_image(name: str, seeds: list[int], settings: list[str]) -> dict:
    """results/<name>.json's per-image PSNR {title: {method: per seed}}, checked to hold every
    seed and setting of this run."""
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    raw = json.loads(path.read_text())
    if "per_image" not in raw:
        raise ValueError(f"{path} holds no per-image PSNR (made before they were kept); rerun it")
    if raw["seeds"] != seeds:
        raise ValueError(f"{path} has seeds {raw['seeds']}, this run {seeds}")
    missing = [k for k in settings if KEYS[k] not in raw["per_image"]]
    if missing:
        raise ValueError(f"{path} has no settings {missing}")
    return raw["per_image"]


def against_lines(name: str, option: str, seeds: list[int], here: dict, there: dict
                  ) -> list[str]:
    """The table of permuquant_h here minus permuquant_h in run `name`, paired per image."""
    head = " | ".join(f"seed {s}" for s in seeds)
    lines = [f"**permuquant_h (rotate_per_image={option}) − permuquant_h of {name}**", "",
             f"| setting | {head} | mean over draws |", "|---|" + "---|" * (len(seeds) + 1)]
    for title, methods in here.items():
        per_draw = [mean_ci(np.subtract(a, b)) for a, b in
                    zip(methods["permuquant_h"], there[title]["permuquant_h"], strict=True)]
        lines.append(draws_row(title, per_draw))
    return [*lines, ""]


def draws_row(label: str, per_draw: list[tuple[float, float]]) -> str:
    """A table row: per draw the paired difference (mean, half-width) and its verdict, then
    their mean over draws with its Student-t interval."""
    mean, ci = mean_ci([d for d, _ in per_draw])
    cells = " | ".join(f"{d:+.2f} ± {c:.2f} ({verdict(d, c, 'n.s.')})" for d, c in per_draw)
    return f"| {label} | {cells} | {mean:+.2f} ± {ci:.2f} ({verdict(mean, ci, 'n.s.')}) |"


def configs(setting: tuple, rotate_per_image: str) -> list:
    """compare_methods' configs of METHODS for the setting, permuquant_h with the option."""
    out = configs_for(setting, list(METHODS))
    option = (("rotate_per_image", rotate_per_image),)
    return [dataclasses.replace(c, options=option) if c.method == "permuquant_h" else c
            for c in out]


def main() -> None:
    args = parse_args()
    settings = [s for s in SETTINGS if s[0] in {KEYS[k] for k in args.settings}]
    fp = load_pipeline()
    spec = EvalSpec.digits(per_digit=args.per_digit)
    metrics = DigitMetrics()
    # diffs[setting][pair] -> per draw (mean, paired ci)
    diffs: dict = {s[0]: {f"{a} − {b}": [] for a, b in PAIRS} for s in settings}
    psnr: dict = {s[0]: {m: [] for m in METHODS} for s in settings}
    per_image: dict = {s[0]: {m: [] for m in METHODS} for s in settings}
    key = {title: k for k, title in KEYS.items()}
    for seed in args.seeds:
        calib = calibrate_pipeline(fp, n_rows=256, track_batches=64, seed=seed, progress=True)
        for setting in settings:
            runs = compare(fp, calib, configs(setting, args.rotate_per_image), spec,
                           RESULTS / args.name / f"seed{seed}" / key[setting[0]],
                           digit_metrics=metrics)
            by = {r["method"]: r for name, r in runs.items() if name != "full_precision"}
            for m in METHODS:
                psnr[setting[0]][m].append(by[m]["psnr_vs_fp"])
                per_image[setting[0]][m].append(by[m]["psnr_per_image"])
            for a, b in PAIRS:
                d = np.subtract(by[a]["psnr_per_image"], by[b]["psnr_per_image"])
                diffs[setting[0]][f"{a} − {b}"].append(mean_ci(d))
    lines = [f"Made {datetime.date.today().isoformat()} with `.venv/bin/python "
             f"benchmarks/calib_draws.py --seeds {','.join(map(str, args.seeds))} --settings "
             f"{','.join(args.settings)}"
             + ("" if args.rotate_per_image == JOINT_OPTIONS["rotate_per_image"].default
                else f" --rotate-per-image {args.rotate_per_image}")
             + ("" if args.name == "calib_draws" else f" --name {args.name}")
             + ("" if args.against is None else f" --against {args.against}")
             + f"` on the embedded tiny FLUX ({len(spec.prompts)} "
             "images per run, the same evaluation seeds in every draw).", ""]
    for title, pairs in diffs.items():
        head = " | ".join(f"seed {s}" for s in args.seeds)
        lines += [f"**{title}**", "", f"| PSNR vs FP (dB) | {head} |",
                  "|---|" + "---|" * len(args.seeds)]
        lines += [f"| {m} | " + " | ".join(f"{v:.2f}" for v in vals) + " |"
                  for m, vals in psnr[title].items()]
        lines += ["", f"| paired difference (dB) | {head} | mean over draws |",
                  "|---|" + "---|" * (len(args.seeds) + 1)]
        for pair, per_draw in pairs.items():
            lines.append(draws_row(pair, per_draw))
        lines.append("")
    if args.against is not None:
        lines += against_lines(args.against, args.rotate_per_image, args.seeds, per_image,
                               args.against_runs)
    md = "\n".join(lines)
    print(md)
    write_results(args.name, {"seeds": args.seeds, "rotate_per_image": args.rotate_per_image,
                              "psnr": psnr, "per_image": per_image, "paired": {
        t: {p: [{"mean": d, "ci95": c} for d, c in v] for p, v in pairs.items()}
        for t, pairs in diffs.items()}}, md)


if __name__ == "__main__":
    main()
