"""The `pqjax` command.

pqjax demo                                   # the main job on the embedded model
pqjax quantize MODEL --weights nvfp4 --acts nvfp4 --method permuquant --out DIR
pqjax generate DIR "a handwritten digit 7" --out image.png
pqjax report DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def _config(args: argparse.Namespace, method: str | None = None):
    from pqjax.quantize import QuantConfig

    acts = None if args.acts in ("none", "16", "bf16") else args.acts
    crit = tuple(args.criterion.split(",")) if "," in args.criterion else args.criterion
    alpha = (
        tuple(float(a) for a in args.alpha.split(",")) if "," in args.alpha else float(args.alpha)
    )
    return QuantConfig(
        weights=args.weights,
        acts=acts,
        group=args.group,
        method=method or args.method,
        criterion=crit,
        alpha=alpha,
        tau=args.tau,
        backend=args.backend,
    )


def _save_png(images: np.ndarray, path: Path, scale: int) -> None:
    from PIL import Image

    arr = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    tiles = [np.kron(a, np.ones((scale, scale) + (1,) * (a.ndim - 2), np.uint8)) for a in arr]
    Image.fromarray(np.concatenate(tiles, axis=1)).save(path)


def cmd_demo(args: argparse.Namespace) -> int:
    """convert -> calibrate -> permute -> quantize -> save -> restore -> generate -> compare."""
    from pqjax.api import calibrate_pipeline
    from pqjax.checkpoint import restore, save
    from pqjax.eval.compare import EvalSpec, compare, run_name, summary_table
    from pqjax.eval.metrics import DigitMetrics
    from pqjax.pipelines.load import EMBEDDED, load_pipeline
    from pqjax.quantize import QuantConfig

    t0 = time.perf_counter()
    out = Path(args.out)
    fp = load_pipeline(EMBEDDED)
    print(f"model: {EMBEDDED} ({fp.source})")
    calib = calibrate_pipeline(fp, n_rows=args.rows)
    configs = [
        QuantConfig(weights=w, acts=w, group=g, method=m)
        for w, g in (("nvfp4", None), ("int4", 64), ("int3", 64))
        for m in ("rtn", "permuquant")
    ]
    keep: dict = {}
    spec = EvalSpec.digits(per_digit=args.per_digit)
    results = compare(
        fp, calib, configs, spec, out / "report", digit_metrics=DigitMetrics(), keep=keep
    )
    name = run_name(configs[1])
    ckpt = save(keep[name], out / "checkpoints" / name, overwrite=True)
    restored = restore(ckpt)
    same = np.array_equal(
        restored.generate(list(spec.prompts), seed=spec.seed),
        keep[name].generate(list(spec.prompts), seed=spec.seed),
    )
    print("\n" + summary_table(results))
    print(f"\nsave -> restore -> generate is bit-identical to the in-memory pipeline: {same}")
    print(f"checkpoint: {ckpt}")
    print(
        f"report: {(out / 'report').resolve()} (summary.md, metrics.json, grid_*.png, "
        f"*/layer_errors.png)   [{time.perf_counter() - t0:.0f} s]"
    )
    return 0 if same else 1


def cmd_quantize(args: argparse.Namespace) -> int:
    from pqjax.api import calibrate_pipeline, quantize_pipeline
    from pqjax.checkpoint import save
    from pqjax.eval.compare import EvalSpec, compare, run_name, summary_table
    from pqjax.pipelines.load import EMBEDDED, load_pipeline

    fp = load_pipeline(args.model)
    prompts = Path(args.calib_prompts).read_text().splitlines() if args.calib_prompts else None
    calib = calibrate_pipeline(fp, prompts, n_rows=args.rows)
    config = _config(args)
    q = quantize_pipeline(fp, calib, config)
    out = save(q, args.out, overwrite=args.overwrite)
    print(f"saved {config.label} {config.method} checkpoint to {out}")
    s = q.report.summary
    print(
        f"mean layer error {s['mean_err']:.4g} (RTN {s['mean_err_rtn']:.4g}); "
        f"{s['sites_accepted']}/{s['n_sites']} permutation sites accepted; "
        f"{q.report.sizes['compression_vs_bf16']:.2f}x smaller than bf16"
    )
    if not args.no_compare:
        embedded = str(args.model) == EMBEDDED
        spec = EvalSpec.digits(per_digit=2) if embedded else EvalSpec(("a photo of a cat",))
        metrics = None
        if embedded:
            from pqjax.eval.metrics import DigitMetrics

            metrics = DigitMetrics()
        configs = [_config(args, "rtn")] if config.method != "rtn" else []
        results = compare(fp, calib, [*configs, config], spec, out / "compare",
                          digit_metrics=metrics, quantized={run_name(config): q})
        print(summary_table(results))
        print(f"report: {out / 'compare'}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from pqjax.checkpoint import restore

    pipe = restore(args.checkpoint, backend=args.backend)
    images = pipe.generate(
        args.prompt, seed=args.seed, num_steps=args.steps, guidance=args.guidance, progress=True
    )
    _save_png(images, Path(args.out), args.scale)
    print(f"wrote {args.out} ({len(images)} image(s), {images.shape[1]}x{images.shape[2]})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pqjax.eval.compare import summary_table

    root = Path(args.checkpoint)
    rep = root / "report" / "report.json"
    if not rep.is_file():
        print(f"{root}: no report/report.json (is this a pqjax checkpoint?)", file=sys.stderr)
        return 2
    report = json.loads(rep.read_text())
    print(f"{report['label']} {report['method']}: {json.dumps(report['summary'], indent=1)}")
    print(f"sizes: {report['sizes']}")
    metrics = root / "compare" / "metrics.json"
    if metrics.is_file():
        print(summary_table(json.loads(metrics.read_text())))
    print(f"per-layer error plot: {root / 'report' / 'layer_errors.png'}")
    return 0


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    from pqjax import formats

    names = formats.names()
    p.add_argument("--weights", default="nvfp4", choices=names)
    p.add_argument("--acts", default="nvfp4", choices=[*names, "none"])
    p.add_argument("--group", type=int, default=None, help="group size for INT formats")
    p.add_argument("--method", default="permuquant")
    p.add_argument(
        "--criterion",
        default="joint_second_moment",
        help="a criterion name, or several separated by commas",
    )
    p.add_argument("--alpha", default="0.5", help="a value, or several separated by commas")
    p.add_argument("--tau", type=float, default=0.0)
    p.add_argument("--backend", default="xla", choices=["xla", "xla_packed", "pallas"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pqjax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("demo", help="the main job on the embedded trained tiny FLUX")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--per-digit", type=int, default=5)
    p.add_argument("--rows", type=int, default=256, help="sampled calibration rows per layer")
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("quantize", help="calibrate, permute, quantize and save a model")
    p.add_argument("model", nargs="?", default="tiny-flux-digits")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--calib-prompts", help="a text file with one prompt per line")
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--no-compare", action="store_true", help="skip the image comparison")
    _add_quant_args(p)
    p.set_defaults(fn=cmd_quantize)
    p = sub.add_parser("generate", help="generate images from a saved checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("prompt", nargs="+")
    p.add_argument("--out", default="image.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--scale", type=int, default=8, help="nearest-neighbour upscale of the PNG")
    p.add_argument("--backend", default="xla", choices=["xla", "xla_packed", "pallas"])
    p.set_defaults(fn=cmd_generate)
    p = sub.add_parser("report", help="print a checkpoint's quantization report")
    p.add_argument("checkpoint")
    p.set_defaults(fn=cmd_report)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
