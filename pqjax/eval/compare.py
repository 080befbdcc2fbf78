"""Run several quantization configs on one model and compare them with full precision.

    results = compare(fp_pipe, calib, configs, EvalSpec.digits(per_digit=5), "out/report")

Writes `index.html` (the report page, see `pqjax.eval.html`), `metrics.json`, `summary.md`,
one image grid per format (rows: full precision, then each method; columns share seeds) and
each run's own report folder.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pqjax.api import quantize_pipeline
from pqjax.calibrate import Calibration
from pqjax.eval.html import ComparisonView, comparison_page, write_page
from pqjax.eval.metrics import (
    SSIM_WINDOW,
    DigitMetrics,
    mean_ci,
    psnr_per_image,
    ssim_per_image,
)
from pqjax.eval.plots import image_grid
from pqjax.pipelines.pipeline import Pipeline
from pqjax.quantize import QuantConfig


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """Evaluation prompts (with digit labels where they apply) and a seed apart from calibration."""

    prompts: tuple[str, ...]
    labels: tuple[int, ...] | None = None
    seed: int = 1234
    num_steps: int | None = None
    height: int | None = None  # None: the pipeline's own
    width: int | None = None

    @classmethod
    def digits(cls, per_digit: int = 5, seed: int = 1234) -> EvalSpec:
        labels = tuple(d for _ in range(per_digit) for d in range(10))
        return cls(tuple(f"a handwritten digit {d}" for d in labels), labels, seed)


def generate(pipe: Pipeline, spec: EvalSpec) -> np.ndarray:
    size = {k: v for k, v in (("height", spec.height), ("width", spec.width)) if v is not None}
    return pipe.generate(list(spec.prompts), seed=spec.seed, num_steps=spec.num_steps, **size)


def evaluate(
    images: np.ndarray, reference: np.ndarray, spec: EvalSpec, digit_metrics: DigitMetrics | None
) -> dict[str, Any]:
    """PSNR and SSIM against full precision, each a mean over images with its 95% interval
    (`*_ci95`: the half-width; `psnr_per_image` for paired comparisons between runs on the
    same seeds), and the digit metrics where the prompts are labelled."""
    per_image = psnr_per_image(images, reference)
    p, p_ci = mean_ci(per_image)
    out: dict[str, Any] = {"psnr_vs_fp": p, "psnr_ci95": p_ci,
                           "psnr_per_image": [float(v) for v in per_image]}
    if min(np.shape(images)[1:3]) >= SSIM_WINDOW:
        out["ssim_vs_fp"], out["ssim_ci95"] = mean_ci(ssim_per_image(images, reference))
    if digit_metrics is not None and spec.labels is not None:
        out.update(digit_metrics(images, spec.labels))
    return out


def run_name(config: QuantConfig) -> str:
    return f"{config.label.replace(' ', '_')}_{config.method}"


def compare(
    fp: Pipeline,
    calib: Calibration,
    configs: Sequence[QuantConfig],
    spec: EvalSpec,
    out_dir: str | Path,
    *,
    digit_metrics: DigitMetrics | None = None,
    keep: dict[str, Pipeline] | None = None,
    quantized: Mapping[str, Pipeline] | None = None,
) -> dict[str, Any]:
    """Quantize with each config, generate with the same seeds, score, and write the report.

    keep: if given, filled with run name -> quantized pipeline (e.g. to save one).
    quantized: run name (`run_name(config)`) -> a pipeline already quantized with that config
    (and the same calibration): used as it is, not quantized again; its report's time counts.
    """
    quantized = dict(quantized or {})
    for name, q in quantized.items():
        if name not in {run_name(c) for c in configs}:
            raise ValueError(f"compare: quantized={name!r} is not one of the configs' runs")
        if q.report is None:
            raise ValueError(f"compare: quantized[{name!r}] carries no quantization report")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reference = generate(fp, spec)
    count = {"n_images": len(spec.prompts), "seed": spec.seed}
    results: dict[str, Any] = {
        "full_precision": {
            **evaluate(reference, reference, spec, digit_metrics),
            "bytes": None,
            "bf16_bytes": None,
            **count,
        },
    }
    images: dict[str, dict[str, np.ndarray]] = {}
    by_run: dict[str, np.ndarray] = {}
    reports: dict[str, Any] = {}
    for config in configs:
        name = run_name(config)
        t0 = time.perf_counter()
        q = quantized[name] if name in quantized else quantize_pipeline(fp, calib, config)
        seconds = q.report.seconds if name in quantized else time.perf_counter() - t0
        imgs = generate(q, spec)
        rep = q.report
        results[name] = {
            "label": config.label,
            "method": config.method,
            **evaluate(imgs, reference, spec, digit_metrics),
            "bytes": rep.sizes["quantized_bytes"],
            "bf16_bytes": rep.sizes["bf16_bytes"],
            "compression_vs_bf16": rep.sizes["compression_vs_bf16"],
            "mean_layer_error": rep.summary["mean_err"],
            "mean_layer_error_rtn": rep.summary["mean_err_rtn"],
            "sites_accepted": rep.summary["sites_accepted"],
            "n_sites": rep.summary["n_sites"],
            "quantize_seconds": seconds,
            "reused": name in quantized,
            **count,
        }
        rep.save(out / name)
        images.setdefault(config.label, {})[config.method] = imgs
        by_run[name], reports[name] = imgs, rep
        if keep is not None:
            keep[name] = q
    n_cols = min(10, len(spec.prompts))
    col_labels = [p.rsplit(" ", 1)[-1] for p in spec.prompts[:n_cols]]
    for label, by_method in images.items():
        rows = {"full precision": reference[:n_cols]}
        rows.update({m: v[:n_cols] for m, v in by_method.items()})
        image_grid(rows, out / f"grid_{label.replace(' ', '_')}.png", labels=col_labels)
    (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "summary.md").write_text(summary_table(results) + "\n")
    view = ComparisonView(results, reports, reference, by_run, captions=col_captions(spec),
                          seed=spec.seed, num_steps=spec.num_steps)
    write_page(out / "index.html", comparison_page(view))
    return results


def col_captions(spec: EvalSpec) -> list[str]:
    """A short caption per evaluation image: 'digit 7', else the prompt cut to 24 characters."""
    if spec.labels is not None:
        return [f"digit {d}" for d in spec.labels]
    return [p if len(p) <= 24 else p[:23] + "…" for p in spec.prompts]


def summary_table(results: dict[str, Any]) -> str:
    """Markdown table of the runs (PSNR and SSIM vs full precision, accuracy, Fréchet, size, time),
    under a caption with the number of images it was measured on."""
    fp = results.get("full_precision", {})
    caption = ""
    if "n_images" in fp:
        caption = (f"Comparison on {fp['n_images']} images per run (seed {fp['seed']}); its "
                   "Fréchet figure depends on that count (the README's demo table uses 50).\n\n")
    has_digits = "accuracy" in results.get("full_precision", {})
    has_ssim = "ssim_vs_fp" in results.get("full_precision", {})
    head = "| run | PSNR vs FP (dB, ±95% CI) |" + (" SSIM vs FP |" if has_ssim else "")
    head += " accuracy | Fréchet |" if has_digits else ""
    head += " mean layer error (RTN) | size vs bf16 | quantize s |"
    cols = head.count("|") - 1
    lines = [head, "|" + "---|" * cols]
    for name, r in results.items():
        fp_row = name == "full_precision"
        ps = "∞" if fp_row else f"{r['psnr_vs_fp']:.2f} ± {r.get('psnr_ci95', 0.0):.2f}"
        row = f"| {name} | {ps} |"
        if has_ssim:
            row += " 1 |" if fp_row else f" {r['ssim_vs_fp']:.3f} ± {r['ssim_ci95']:.3f} |"
        if has_digits:
            row += f" {r['accuracy']:.3f} | {r['frechet']:.2f} |"
        if name == "full_precision":
            row += " – | 1.00x | – |"
        else:
            row += (
                f" {r['mean_layer_error']:.4f} ({r['mean_layer_error_rtn']:.4f}) |"
                f" {r['compression_vs_bf16']:.2f}x smaller | {r['quantize_seconds']:.1f} |"
            )
        lines.append(row)
    return caption + "\n".join(lines)
