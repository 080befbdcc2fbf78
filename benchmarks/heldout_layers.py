"""Does PermuQuant's per-layer gain on calibration data hold on held-out inputs?

    .venv/bin/python benchmarks/heldout_layers.py

On the embedded trained tiny FLUX: calibrate on the default calibration prompts (seed 0),
quantize with PermuQuant, then measure every quantized layer's error with and without its
site's accepted order on held-out trajectories (every digit, other noise seeds). On calibration
data PermuQuant <= RTN by construction; this reports how often and by how much it also holds on
held-out data, for NVFP4, MXFP4, INT4 g64 and INT3 g64 (W4A4 / W3A3).
Writes benchmarks/results/heldout_layers.{json,md}.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_results
from pqjax import permute
from pqjax.api import calibrate_pipeline, default_calib_prompts
from pqjax.pipelines.load import load_pipeline
from pqjax.quantize import QuantConfig, quantize

FORMATS = (("nvfp4", None), ("mxfp4", None), ("int4", 64), ("int3", 64))


def heldout_rows(fp, seed: int):
    prompts = [f"a handwritten digit {d}" for d in range(10)]
    return calibrate_pipeline(fp, prompts, seed=seed, n_rows=256, progress=False)


def main() -> None:
    fp = load_pipeline()
    calib = calibrate_pipeline(fp, n_rows=256, progress=False)
    held = heldout_rows(fp, seed=100)
    sites = {s.name: s for s in permute.sites(fp.transformer)}
    results = {}
    for weights, group in FORMATS:
        config = QuantConfig(weights=weights, acts=weights, group=group)
        _, report = quantize(fp.transformer, calib, config)
        wf, af = config.weight_format(), config.act_format()
        gains, held_ratio, calib_ratio, not_worse = [], [], [], 0
        rows = [r for r in report.layers if r.get("site") in report.perms]
        for r in rows:
            site = sites[r["site"]]
            kernel = permute.module_at(fp.transformer, r["layer"]).kernel[...]
            x = held[r["layer"]].rows  # its own input (to_add_out reads the text tokens)
            e_rtn, e_pq = (permute.layer_errors(x, [kernel], p, wf, af)[0]
                           for p in (np.arange(site.dim), report.perms[site.name]))
            held_ratio.append(e_pq / e_rtn)
            calib_ratio.append(r["err"] / r["err_rtn"])
            not_worse += e_pq <= e_rtn
            gains.append(1 - e_pq / e_rtn)
        results[config.label] = {
            "layers": len(report.layers),
            "layers_with_accepted_order": len(rows),
            "heldout_not_worse": int(not_worse),
            "heldout_mean_error_ratio": float(np.mean(held_ratio)) if rows else None,
            "calib_mean_error_ratio": float(np.mean(calib_ratio)) if rows else None,
            "heldout_median_gain": float(np.median(gains)) if rows else None,
            "heldout_worst_ratio": float(np.max(held_ratio)) if rows else None,
        }
        print(config.label, results[config.label])
    table = ["| format | layers permuted / quantized | held-out: PermuQuant <= RTN | "
             "mean error ratio PQ/RTN (calibration -> held-out) | median held-out gain | "
             "worst held-out ratio |", "|---|---|---|---|---|---|"]
    for label, r in results.items():
        if not r["layers_with_accepted_order"]:
            table.append(f"| {label} | 0 / {r['layers']} | – | – | – | – |")
            continue
        table.append(
            f"| {label} | {r['layers_with_accepted_order']} / {r['layers']} | "
            f"{r['heldout_not_worse']} / {r['layers_with_accepted_order']} | "
            f"{r['calib_mean_error_ratio']:.3f} -> {r['heldout_mean_error_ratio']:.3f} | "
            f"{100 * r['heldout_median_gain']:.1f}% | {r['heldout_worst_ratio']:.3f} |")
    md = "\n".join(table) + (
        f"\n\nCalibration: the model's {len(default_calib_prompts(fp))} calibration prompts "
        "(one per digit), seed 0; held-out: one prompt per digit, seed 100 (other noise, so other "
        "trajectories); 256 sampled rows per layer. Layers "
        "whose site kept the identity order have equal errors and are not counted.")
    print(md)
    write_results("heldout_layers", {"results": results}, md)


if __name__ == "__main__":
    main()
