"""Does PermuQuant's per-layer gain on calibration data hold on held-out inputs?

    .venv/bin/python benchmarks/heldout_layers.py

On the embedded trained tiny FLUX: calibrate on the default calibration prompts (seed 0),
quantize with PermuQuant, then measure every quantized layer's error with and without its
site's accepted order on held-out trajectories (every digit, other noise seeds). On calibration
data PermuQuant <= RTN by construction; this reports how often and by how much it also holds on
held-out data, for NVFP4, MXFP4, INT4 g64 and INT3 g64 (W4A4 / W3A3).
Writes benchmarks/results/heldout_layers.{json,md}.

    .venv/bin/python benchmarks/heldout_layers.py --joint

The same question for the rotations: PermuQuant, Hadamard and PermuQuant-H, each layer's error
as the method deploys it (its site's order, its rotation), on the calibration rows and on the
held-out ones; does PermuQuant-H's lower calibration error hold off the calibration data?
Writes benchmarks/results/heldout_joint.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_results
from pqjax import permute
from pqjax.api import calibrate_pipeline, default_calib_prompts
from pqjax.engine import quantize
from pqjax.methods import get_method, kernel_of
from pqjax.pipelines.load import load_pipeline
from pqjax.quantize import QuantConfig, quantizable

FORMATS = (("nvfp4", None), ("mxfp4", None), ("int4", 64), ("int3", 64))


def heldout_rows(fp, seed: int):
    prompts = [f"a handwritten digit {d}" for d in range(10)]
    return calibrate_pipeline(fp, prompts, seed=seed, n_rows=256, progress=False)


JOINT = ("permuquant", "hadamard", "permuquant_h")


def deployed_errors(model, calib, held, config: QuantConfig) -> dict[str, tuple[float, float]]:
    """layer path -> (calibration error, held-out error) of `config.method`'s choice for the
    layer (its site's absorbed order and its rotation; methods without a scale)."""
    plan = get_method(config.method)(model, calib, config, quantizable(model, config))
    wf, af = config.weight_format(), config.act_format()
    out = {}
    for path, row in plan.layers.items():
        if path not in held:
            continue
        kernel = kernel_of(model, path)
        perm = plan.perms.get(row.get("site"), np.arange(kernel.shape[0]))
        held_err = permute.layer_errors(held[path].rows, [kernel], perm, wf, af,
                                        row.get("transform"))[0]
        out[path] = (row["err"], held_err)
    return out


def joint(fp, calib, held) -> None:
    results, table = {}, [
        "| format | method | mean layer error, calibration | held-out | held-out vs "
        "PermuQuant (geometric mean of per-layer ratios) | layers where PermuQuant-H is "
        "below / above PermuQuant by > 1%, held out |", "|---|---|---|---|---|---|"]
    for weights, group in (f for f in FORMATS if f[0] != "mxfp4"):
        errs = {m: deployed_errors(fp.transformer, calib, held, QuantConfig(
            weights=weights, acts=weights, group=group, method=m)) for m in JOINT}
        paths = sorted(set.intersection(*(set(e) for e in errs.values())))
        label = QuantConfig(weights=weights, acts=weights, group=group).label
        pq, h = (np.array([errs[m][p][1] for p in paths]) for m in ("permuquant", "permuquant_h"))
        for m in JOINT:
            cal, ho = (np.array([errs[m][p][i] for p in paths]) for i in (0, 1))
            row = {"layers": len(paths), "calib_mean": float(cal.mean()),
                   "heldout_mean": float(ho.mean()),
                   "heldout_geomean_vs_permuquant": float(np.exp(np.mean(np.log(ho / pq))))}
            if m == "permuquant_h":
                row.update(below=int(np.sum(h < pq / 1.01)), above=int(np.sum(h > pq * 1.01)))
            results.setdefault(label, {})[m] = row
            split = f"{row['below']} / {row['above']}" if m == "permuquant_h" else "–"
            table.append(f"| {label} | {m} | {row['calib_mean']:.5f} | {row['heldout_mean']:.5f}"
                         f" | {row['heldout_geomean_vs_permuquant']:.3f} | {split} |")
        print(label, results[label], flush=True)
    md = "\n".join(table) + (
        "\n\nEvery quantized layer with rows in both sets; errors are each layer's relative "
        "output error with the method's order and rotation on the full-precision model's "
        "inputs. Calibration and held-out rows as in heldout_layers.md.")
    print(md)
    write_results("heldout_joint", {"results": results}, md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--joint", action="store_true", help="PermuQuant, Hadamard, PermuQuant-H")
    args = ap.parse_args()
    fp = load_pipeline()
    calib = calibrate_pipeline(fp, n_rows=256, progress=False)
    held = heldout_rows(fp, seed=100)
    if args.joint:
        return joint(fp, calib, held)
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
