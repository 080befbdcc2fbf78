"""The `pqjax` command.

pqjax demo                                   # the main job on the embedded model
pqjax quantize MODEL --weights nvfp4 --method permuquant --out DIR
pqjax generate DIR "a handwritten digit 7" "3" --out images/
pqjax report DIR

Every argument is checked (pqjax.cli_args) before any model is loaded; a user error prints one
or two lines on stderr and exits with code 2 (`--debug`: the traceback). Compiled programs are
kept in jax's persistent cache (pqjax.compile_cache; `--no-compile-cache` or
PQJAX_COMPILE_CACHE=0 turns it off), so a second identical call does not compile again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from pqjax.cli_args import UsageError, build_parser, check, quant_config
from pqjax.cli_images import save_images

# library errors that mean bad input (each names the file, key or argument)
USER_ERRORS = (UsageError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError)


def warn_pallas_without_gpu(backend: str) -> None:
    """The README's promise: --backend pallas off a CUDA GPU says that XLA serves instead."""
    if backend != "pallas":
        return
    from pqjax.backends import dispatch

    # The library's own once-per-process warning, printed here before any work (and then not
    # repeated when the model is switched).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", dispatch.PallasFallbackWarning)
        dispatch.warn_no_gpu()
    for w in caught:
        print(f"pqjax: warning: --backend pallas: {w.message}", file=sys.stderr)


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
    from pqjax.api import (
        calibrate_pipeline,
        choose_path,
        convert_and_quantize,
        default_budget,
        quantize_pipeline,
    )
    from pqjax.backends import set_backend
    from pqjax.checkpoint import save
    from pqjax.eval.compare import EvalSpec, compare, run_name, summary_table
    from pqjax.pipelines.load import EMBEDDED, load_pipeline, resolve_root

    config = args.config
    warn_pallas_without_gpu(args.backend)
    size = dict(num_steps=args.steps, height=args.height, width=args.width)
    budget = args.max_memory if args.max_memory is not None else default_budget()
    if choose_path(resolve_root(args.model), config, budget,
                   allow_pickle=args.allow_pickle).stream:
        q = convert_and_quantize(args.model, config, args.calib_prompt_list,
                                 calib_steps=args.steps, height=args.height, width=args.width,
                                 n_rows=args.rows, allow_pickle=args.allow_pickle,
                                 max_memory=budget, work_dir=args.work_dir, backend=args.backend)
        fp = calib = None
    else:
        fp = load_pipeline(args.model, allow_pickle=args.allow_pickle,
                           max_memory=args.max_memory)
        calib = calibrate_pipeline(fp, args.calib_prompt_list, n_rows=args.rows, **size)
        q = quantize_pipeline(fp, calib, config)
        set_backend(q.transformer, args.backend)
    out = save(q, args.out, overwrite=args.overwrite)
    print(f"saved {config.label} {config.method} checkpoint to {out}")
    s = q.report.summary
    print(
        f"mean layer error {s['mean_err']:.4g} (RTN {s['mean_err_rtn']:.4g}); "
        f"{s['sites_accepted']}/{s['n_sites']} permutation sites accepted; "
        f"{q.report.sizes['compression_vs_bf16']:.2f}x smaller than bf16"
    )
    if fp is None and not args.no_compare:
        print("comparison skipped: the full-precision model does not fit --max-memory")
    elif not args.no_compare:
        embedded = str(args.model) == EMBEDDED
        spec = EvalSpec.digits(per_digit=2) if embedded else EvalSpec(("a photo of a cat",))
        spec = dataclasses.replace(spec, **size)
        metrics = None
        if embedded:
            from pqjax.eval.metrics import DigitMetrics

            metrics = DigitMetrics()
        configs = [quant_config(args, "rtn")] if config.method != "rtn" else []
        results = compare(fp, calib, [*configs, config], spec, out / "compare",
                          digit_metrics=metrics, quantized={run_name(config): q})
        print(summary_table(results))
        print(f"report: {out / 'compare'}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from pqjax.checkpoint import restore

    warn_pallas_without_gpu(args.backend)
    pipe = restore(args.checkpoint, backend=args.backend, max_memory=args.max_memory)
    steps = args.steps or pipe.defaults.num_inference_steps
    print(f"sampling {len(args.prompt)} image(s), {steps} steps", flush=True)
    images = pipe.generate(
        args.prompt,
        seed=args.seed,
        num_steps=args.steps,
        guidance=args.guidance,
        height=args.height,
        width=args.width,
        progress=args.progress,
    )
    save_images(images, args.image_paths, args.scale, args.grid)
    where = args.image_paths[0] if len(args.image_paths) == 1 else args.image_paths[0].parent
    size = f"{images.shape[1] * args.scale}x{images.shape[2] * args.scale}"
    print(f"wrote {len(images)} image(s) of {size} to {where}" + (" (joined)" if args.grid else ""))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pqjax.eval.compare import summary_table

    root = Path(args.checkpoint)
    rep = root / "report" / "report.json"
    report = json.loads(rep.read_text())
    print(f"{report['label']} {report['method']}: {json.dumps(report['summary'], indent=1)}")
    print(f"sizes: {report['sizes']}")
    metrics = root / "compare" / "metrics.json"
    if metrics.is_file():
        print(summary_table(json.loads(metrics.read_text())))
    print(f"per-layer error plot: {root / 'report' / 'layer_errors.png'}")
    return 0


COMMANDS = {
    "demo": cmd_demo,
    "quantize": cmd_quantize,
    "generate": cmd_generate,
    "report": cmd_report,
}


def _print_error(prog: str, e: BaseException) -> None:
    """One or two lines: the message's first line, then the rest joined."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()] or [
        type(e).__name__
    ]
    print(f"{prog}: error: {lines[0]}", file=sys.stderr)
    if len(lines) > 1:
        print("  " + " ".join(lines[1:]), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default sys.argv[1:]); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    prog = "pqjax" + next((f" {a}" for a in argv if a in COMMANDS), "")
    try:
        args = build_parser().parse_args(argv)
        check(args)
        if not args.no_compile_cache:
            from pqjax import compile_cache

            compile_cache.enable()
        return COMMANDS[args.cmd](args)
    except USER_ERRORS as e:
        if debug:
            raise
        _print_error(prog, e)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
