"""The report as one self-contained HTML page: inline CSS, every image a base64 data URI.

    write_page(out / "index.html", run_page(report))              # one quantization run
    write_page(out / "index.html", comparison_page(view))         # runs against full precision

Sections (element ids): config, versions, summary, images, layers, worst, channels. Nothing is
fetched from the network; the page opens from a file in any browser.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import html
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pqjax.eval import plots
from pqjax.eval.metrics import psnr

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
 color:#1f2933;background:#f5f7fa;margin:0}
main{max-width:1360px;margin:0 auto;padding:24px 32px 64px}
h1{font-size:26px;margin:0 0 4px} h2{font-size:20px;margin:36px 0 10px;padding-top:8px;
 border-top:1px solid #d9e2ec} h3{font-size:15px;margin:18px 0 8px}
.sub{color:#52606d;margin:0 0 16px}
nav a{margin-right:14px;color:#1f6fb2;text-decoration:none}
table{border-collapse:collapse;background:#fff;margin:6px 0 10px;font-size:13px}
th,td{border:1px solid #d9e2ec;padding:4px 9px;text-align:right;white-space:nowrap}
th{background:#eef2f6} td.l,th.l{text-align:left} td.mono{font-family:ui-monospace,Menlo,monospace;
 font-size:12px;text-align:left}
tr.best td{font-weight:600}
dl.legend{display:grid;grid-template-columns:max-content 1fr;gap:3px 14px;font-size:13px;
 color:#3e4c59;margin:4px 0 0} dl.legend dt{font-weight:600} dl.legend dd{margin:0}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{background:#fff;border:1px solid #d9e2ec;border-radius:6px;padding:6px 6px 4px;
 text-align:center;font-size:12px}
.card img{width:var(--px);height:var(--px);image-rendering:pixelated;margin:0 1px;
 vertical-align:top}
.card .cap{color:#3e4c59;margin-top:2px}
.cols{display:flex;gap:2px;justify-content:center;font-size:10px;color:#7b8794}
.cols span{width:var(--px)}
.plot{background:#fff;border:1px solid #d9e2ec;border-radius:6px;padding:6px;max-width:100%}
.plots{display:grid;grid-template-columns:repeat(2,minmax(0,1fr));gap:12px}
.plots img{width:100%}
.note{color:#52606d;font-size:13px;margin:4px 0 8px}
.bar{display:inline-block;height:10px;background:#e4b363;vertical-align:middle}
"""

SUMMARY_LEGEND = {
    "run": "quantization format and method (full_precision: the unquantized model)",
    "PSNR vs FP": "mean over images of 10·log10(1/MSE) against the full-precision image from the "
    "same noise, in dB, ± the half-width of its Student-t 95% interval over images; higher is "
    "closer",
    "SSIM vs FP": "mean over images of the structural similarity (Wang et al. 2004: 11×11 "
    "Gaussian window, σ 1.5) against the full-precision image, ± its 95% interval; 1 is equal",
    "accuracy": "share of images a classifier fitted on real digits labels as the prompt's digit",
    "Fréchet": "Fréchet distance of classifier features, generated against real digits; lower is "
    "better. It depends on the number of images: compare it only at the same count",
    "mean layer error": "mean over quantized layers of ‖XW − Q(X)Q(W)‖² / ‖XW‖² on the "
    "calibration rows; RTN's on the same rows in brackets",
    "sites": "permutation sites whose order was accepted / sites searched",
    "size vs bf16": "whole transformer, bf16 bytes / quantized bytes",
    "quantize s": "seconds to quantize (search, absorb, pack)",
}

RUN_LEGEND = {
    "n_layers": "quantized Linear layers",
    "mean_err_rtn": "mean relative output error of plain round-to-nearest, ‖XW − Q(X)Q(W)‖² / "
    "‖XW‖² on the calibration rows",
    "mean_err": "the same mean for this method",
    "layers_not_worse_than_rtn": "layers whose error is at most RTN's",
    "n_sites": "permutation sites searched",
    "sites_accepted": "sites whose channel order lowered the error and was kept",
}


@dataclasses.dataclass
class ComparisonView:
    """What `comparison_page` shows. images: run name -> `(n, h, w[, 3])` in [0, 1];
    reference: the full-precision images from the same noise; reports: run name ->
    QuantReport (or anything with its attributes)."""

    results: dict[str, Any]
    reports: dict[str, Any]
    reference: np.ndarray
    images: dict[str, np.ndarray]
    captions: Sequence[str]
    seed: int
    num_steps: int | None = None
    title: str = "pqjax quantization report"
    n_show: int = 10


def write_page(path: str | Path, page: str) -> Path:
    """Write `page` to `path` atomically (a temporary file, then a rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _e(x: Any) -> str:
    return html.escape(str(x))


def _num(x: Any, fmt: str = ".4g") -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return _e(x)
    return "∞" if math.isinf(x) else ("–" if math.isnan(x) else format(x, fmt))


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1,
           classes: Sequence[str] = ()) -> str:
    """An HTML table; cells are already-escaped HTML; the first `left` columns align left."""
    th = "".join(f'<th class="l">{h}</th>' if i < left else f"<th>{h}</th>"
                 for i, h in enumerate(head))
    body = []
    for k, row in enumerate(rows):
        cls = f' class="{classes[k]}"' if k < len(classes) and classes[k] else ""
        tds = "".join(f'<td class="l">{c}</td>' if i < left else f"<td>{c}</td>"
                      for i, c in enumerate(row))
        body.append(f"<tr{cls}>{tds}</tr>")
    return f"<table><tr>{th}</tr>{''.join(body)}</table>"


def _legend(items: dict[str, str]) -> str:
    return '<dl class="legend">' + "".join(
        f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in items.items()) + "</dl>"


def _page(title: str, subtitle: str, sections: list[tuple[str, str, str]]) -> str:
    nav = " ".join(f'<a href="#{sid}">{_e(name)}</a>' for sid, name, _ in sections)
    body = "".join(f'<section id="{sid}"><h2>{_e(name)}</h2>{content}</section>'
                   for sid, name, content in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>"
            f"<h1>{_e(title)}</h1><p class=\"sub\">{subtitle}</p><nav>{nav}</nav>{body}"
            "</main></body></html>\n")


def _config_table(reports: dict[str, Any]) -> str:
    keys = ["weights", "acts", "group", "method", "criterion", "alpha", "tau", "backend", "seed"]
    rows = []
    for name, rep in reports.items():
        cfg = rep.config
        skip = cfg.get("skip", ())
        rows.append([_e(name), *(_e(cfg.get(k)) for k in keys), _e(len(skip)),
                     _e(cfg.get("options") or "–")])
    head = ["run", *keys, "skip patterns", "options"]
    return _table(head, rows, left=1) + '<p class="note">Layers matching a skip pattern '\
        "(embedders, final projection) stay 16-bit.</p>"


def _versions_table(reports: dict[str, Any]) -> str:
    names = ["pqjax", "jax", "jaxlib", "flax", "numpy", "python"]
    rows = [[_e(n), *(_e(r.versions.get(k, "?")) for k in names)]
            for n, r in reports.items()]
    return _table(["run", *names], rows) if rows else "<p>no versions recorded</p>"


def _worst(rep: Any, n: int = 20) -> str:
    rows = [r for r in rep.layers if "err" in r]
    rows.sort(key=lambda r: -r["err"])
    top = max((r["err"] for r in rows), default=1.0) or 1.0
    cells = []
    for r in rows[:n]:
        ratio = r["err"] / r["err_rtn"] if r.get("err_rtn") else math.nan
        bar = f'<span class="bar" style="width:{80 * r["err"] / top:.0f}px"></span>'
        cells.append([_e(r["layer"]), _e(plots._short(plots.block_of(r["layer"]))),
                      _e(r.get("site") or "–"),
                      _num(r.get("err_rtn", math.nan)), f'{_num(r["err"])} {bar}',
                      _num(ratio, ".3f"), "yes" if r.get("accepted") else "no"])
    head = ["layer", "block", "site", "RTN error", "error", "error / RTN", "order accepted"]
    return _table(head, cells, left=3)


def _layer_sections(reports: dict[str, Any]) -> tuple[str, str, str]:
    """(ratio plots, worst-20 tables, channel statistics) of every run."""
    plots_html, worst, channels = [], [], []
    shown = {n: r for n, r in reports.items() if r.method != "rtn"} or reports
    for name, rep in shown.items():
        if rep.method == "rtn":
            plots_html.append(f"<h3>{_e(name)}</h3><p class=\"note\">RTN is the baseline: its "
                              "ratio is 1 at every layer.</p>")
        elif rep.layers:
            png = plots.layer_ratio_plot(rep.layers, rep.method)
            plots_html.append(f'<h3>{_e(name)}</h3><img class="plot" src="{data_uri(png)}" '
                              f'alt="error ratio per layer, {_e(name)}">')
        worst.append(f"<h3>{_e(name)}</h3>{_worst(rep)}")
        stats = getattr(rep, "channel_stats", None) or []
        figs = []
        for st in stats:
            perm = rep.perms.get(st["site"]) if rep.perms else None
            if perm is None:
                continue
            title = f"{st['site']} ({st['kind']}): site error −{100 * st['gain']:.0f}%"
            png = plots.channel_range_plot(np.asarray(st["act_absmax"]), perm, st["group"], title)
            figs.append(f'<img class="plot" src="{data_uri(png)}" alt="{_e(title)}">')
        if figs:
            channels.append(f"<h3>{_e(name)}</h3><div class=\"plots\">{''.join(figs)}</div>")
        elif rep.method != "rtn":
            channels.append(f"<h3>{_e(name)}</h3><p class=\"note\">no accepted permutation "
                            "with channel statistics in this report.</p>")
    intro = ('<p class="note">Dynamic range (max / min of the channels\' calibration absmax) '
             "of each quantization group of the site's input, before and after the "
             "permutation, for the sites whose error fell the most. A group's scale is set by "
             "its loudest channel; a smaller range leaves quiet channels more levels.</p>")
    return ("".join(plots_html), "".join(worst),
            intro + ("".join(channels) or '<p class="note">no permutation runs.</p>'))


def _px(reference: np.ndarray) -> int:
    return 64 if reference.shape[1] <= 64 else 160


def _thumb(img: np.ndarray, limit: int = 256) -> bytes:
    arr = np.clip(np.asarray(img, np.float32), 0, 1)
    if max(arr.shape[:2]) > limit:  # full-size photos would make a page of many megabytes
        from PIL import Image

        im = Image.fromarray((arr * 255).round().astype(np.uint8))
        im.thumbnail((limit, limit))
        return plots.png_bytes(np.asarray(im))
    return plots.png_bytes(arr)


def _images_section(view: ComparisonView) -> str:
    n = min(view.n_show, len(view.reference))
    runs = [k for k in view.images if k != "full_precision"]
    diffs = [np.abs(np.asarray(view.images[k][:n], np.float32) - view.reference[:n])
             for k in runs]
    vmax = max([float(d.max()) for d in diffs] + [1 / 255])
    ref = [data_uri(_thumb(im)) for im in view.reference[:n]]
    px = _px(view.reference)
    out = [f'<p class="note">Each card: full precision | quantized | difference |Q − FP| '
           f"(colour scale 0 to {vmax:.3f}, the same for every run), same noise (seed "
           f"{view.seed}); the first {n} of {len(view.reference)} images per run, with each "
           "image's PSNR against full precision.</p>"]
    for k in runs:
        imgs = view.images[k]
        res = view.results.get(k, {})
        cards = []
        for j in range(n):
            heat = plots.png_bytes(plots.diff_heatmap(imgs[j], view.reference[j], vmax))
            p = psnr(imgs[j][None], view.reference[j][None])
            cap = view.captions[j] if j < len(view.captions) else str(j)
            cards.append(
                f'<div class="card" style="--px:{px}px"><div class="cols"><span>FP</span>'
                f"<span>Q</span><span>diff</span></div>"
                f'<img src="{ref[j]}" alt="full precision"><img src="{data_uri(_thumb(imgs[j]))}"'
                f' alt="quantized"><img src="{data_uri(heat)}" alt="difference">'
                f'<div class="cap">{_e(cap)} · {p:.1f} dB</div></div>')
        head = f"{k}: mean PSNR {_num(res.get('psnr_vs_fp', math.nan), '.2f')} dB"
        out.append(f'<h3>{_e(head)}</h3><div class="cards">{"".join(cards)}</div>')
    return "".join(out)


def summary_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]], list[str]]:
    """(head, rows, row classes) of the runs table; the best PSNR row is marked."""
    has_digits = "accuracy" in results.get("full_precision", {})
    has_ssim = "ssim_vs_fp" in results.get("full_precision", {})
    head = ["run", "PSNR vs FP (dB)"] + (["SSIM vs FP"] if has_ssim else [])
    head += ["accuracy", "Fréchet"] if has_digits else []
    head += ["mean layer error (RTN)", "sites", "size vs bf16", "quantize s"]
    runs = {k: v for k, v in results.items() if k != "full_precision"}
    best = max((r["psnr_vs_fp"] for r in runs.values()), default=None)
    rows, classes = [], []
    for name, r in results.items():
        fp = name == "full_precision"
        row = [_e(name), "∞" if fp else _pm(r, "psnr", ".2f")]
        if has_ssim:
            row += ["1" if fp else _pm(r, "ssim", ".3f")]
        if has_digits:
            row += [_num(r["accuracy"], ".3f"), _num(r["frechet"], ".2f")]
        if fp:
            row += ["–", "–", "1.00x", "–"]
        else:
            row += [f"{r['mean_layer_error']:.4f} ({r['mean_layer_error_rtn']:.4f})",
                    f"{r['sites_accepted']}/{r['n_sites']}",
                    f"{r['compression_vs_bf16']:.2f}x smaller", f"{r['quantize_seconds']:.1f}"]
        rows.append(row)
        classes.append("best" if not fp and r["psnr_vs_fp"] == best else "")
    return head, rows, classes


def _pm(r: dict[str, Any], metric: str, fmt: str) -> str:
    """'mean ± half-width' of `<metric>_vs_fp` and `<metric>_ci95` (– where one is missing)."""
    return f"{_num(r[metric + '_vs_fp'], fmt)} ± {_num(r.get(metric + '_ci95', math.nan), fmt)}"


def _stamp() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def comparison_page(view: ComparisonView) -> str:
    """The page of a comparison: runs against full precision, images, layers, channels."""
    n = len(view.reference)
    head, rows, classes = summary_rows(view.results)
    caption = (f'<p class="note">{n} images per run (seed {view.seed}'
               + (f", {view.num_steps} steps" if view.num_steps else "")
               + f"). The Fréchet figure is over these {n} images; it is not comparable with "
               "one over another number of images (the README's demo table uses 50).</p>")
    legend = {k: v for k, v in SUMMARY_LEGEND.items() if any(h.startswith(k) for h in head)}
    plots_html, worst, channels = _layer_sections(view.reports)
    sections = [
        ("config", "Configuration", _config_table(view.reports)),
        ("versions", "Versions", _versions_table(view.reports)),
        ("summary", "Summary", caption + _table(head, rows, classes=classes) + _legend(legend)),
        ("images", "Full precision against quantized", _images_section(view)),
        ("layers", "Per-layer error against RTN", plots_html),
        ("worst", "Worst 20 layers", worst),
        ("channels", "Channel statistics before and after the permutation", channels),
    ]
    sub = f"{len(view.reports)} runs · {n} images each · written {_stamp()}"
    return _page(view.title, _e(sub), sections)


def run_page(rep: Any) -> str:
    """The page of one quantization run (no images: `comparison_page` has those)."""
    reports = {f"{rep.label} {rep.method}": rep}
    s = rep.summary
    rows = [[_e(k), _num(s[k])] for k in RUN_LEGEND if k in s]
    sizes = rep.sizes
    rows += [["size vs bf16", f"{sizes.get('compression_vs_bf16', math.nan):.2f}x smaller"],
             ["quantize s", f"{rep.seconds:.1f}"]]
    legend = {**RUN_LEGEND, "size vs bf16": SUMMARY_LEGEND["size vs bf16"],
              "quantize s": SUMMARY_LEGEND["quantize s"]}
    plots_html, worst, channels = _layer_sections(reports)
    sections = [
        ("config", "Configuration", _config_table(reports)),
        ("versions", "Versions", _versions_table(reports)),
        ("summary", "Summary", _table(["quantity", "value"], rows) + _legend(legend)),
        ("images", "Full precision against quantized",
         '<p class="note">No image comparison in this report; the comparison folder written '
         "beside it (e.g. <code>compare/index.html</code>) has the image grids.</p>"),
        ("layers", "Per-layer error against RTN", plots_html),
        ("worst", "Worst 20 layers", worst),
        ("channels", "Channel statistics before and after the permutation", channels),
    ]
    sub = f"{rep.label} · {rep.method} · {s.get('n_layers', 0)} layers · written {_stamp()}"
    return _page(f"pqjax report: {rep.label} {rep.method}", _e(sub), sections)
