"""Plots people would rather look at than read: per-layer errors and image grids."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def layer_error_bars(
    layers: Sequence[dict[str, Any]], path: str | Path, title: str, method: str = "method"
) -> Path:
    """Grouped bars of each layer's relative output error: RTN against `method` (log scale)."""
    plt = pyplot()
    rows = [r for r in layers if "err_rtn" in r and "err" in r]
    names = [r["layer"] for r in rows]
    rtn = np.array([r["err_rtn"] for r in rows])
    err = np.array([r["err"] for r in rows])
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(8, 0.16 * len(rows) + 2), 4.5))
    ax.bar(x - 0.2, rtn, 0.4, label="RTN", color="#9aa5b1")
    ax.bar(x + 0.2, err, 0.4, label=method, color="#1f77b4")
    ax.set_yscale("log")
    ax.set_ylabel("relative output error  ||XW - Q(X)Q(W)||² / ||XW||²")
    ax.set_title(title)
    ax.set_xticks(x)
    ax.set_xticklabels([_short(n) for n in names], rotation=90, fontsize=6)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _short(name: str) -> str:
    return (
        name.replace("single_transformer_blocks.", "S")
        .replace("transformer_blocks.", "D")
        .replace(".attn.", ".")
        .replace("_context", "_c")
    )


def image_grid(
    rows: dict[str, np.ndarray], path: str | Path, *, labels: Sequence[str] = (), scale: int = 4
) -> Path:
    """Save a PNG grid: one row per entry of `rows` (name -> images `(n, h, w)` or `(n, h, w, 3)`
    in [0, 1]); columns share seeds. Row names are drawn on the left."""
    plt = pyplot()
    n_rows = len(rows)
    n_cols = max(len(v) for v in rows.values())
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(n_cols * 0.45 * scale, n_rows * 0.5 * scale), squeeze=False
    )
    for i, (name, images) in enumerate(rows.items()):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.axis("off")
            if j < len(images):
                img = np.clip(np.asarray(images[j], np.float32), 0, 1)
                ax.imshow(
                    img,
                    cmap="gray" if img.ndim == 2 else None,
                    vmin=0,
                    vmax=1,
                    interpolation="nearest",
                )
            if i == 0 and j < len(labels):
                ax.set_title(labels[j], fontsize=8)
        axes[i][0].text(
            -0.1, 0.5, name, transform=axes[i][0].transAxes, ha="right", va="center", fontsize=9
        )
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


# --- figures for the HTML report (PNG bytes, embedded as data URIs) -------------------------


def png_bytes(image: np.ndarray) -> bytes:
    """PNG of an image `(h, w)` / `(h, w, 3)` in [0, 1] (float) or uint8."""
    import io

    from PIL import Image

    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _plain_log_ticks(axis) -> None:
    """Log-axis tick labels as plain numbers (0.6, 2, 30) instead of 6x10^-1."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(fmt)
    axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def figure_png(fig, dpi: int = 110) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    return buf.getvalue()


def diff_heatmap(image: np.ndarray, reference: np.ndarray, vmax: float) -> np.ndarray:
    """|image - reference| (mean over colour channels) through the 'magma' colour map, scaled
    to `vmax`: `(h, w, 3)` uint8."""
    from matplotlib import colormaps

    diff = np.abs(np.asarray(image, np.float32) - np.asarray(reference, np.float32))
    if diff.ndim == 3:
        diff = diff.mean(axis=-1)
    rgba = colormaps["magma"](np.clip(diff / max(vmax, 1e-6), 0, 1))
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def block_of(name: str) -> str:
    """The block a layer belongs to: its path up to the first numeric component
    ('transformer_blocks.3.attn.to_q' -> 'transformer_blocks.3'), else the first component."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0]


def layer_ratio_plot(layers: Sequence[dict[str, Any]], method: str, baseline: str = "RTN") -> bytes:
    """err / err_rtn of every layer in model order (log scale), accepted sites marked, with
    block boundaries: readable from 40 to ~500 layers (FLUX.1-dev)."""
    plt = pyplot()
    rows = [r for r in layers if r.get("err_rtn") and "err" in r]
    ratio = np.array([r["err"] / r["err_rtn"] for r in rows])
    acc = np.array([bool(r.get("accepted")) for r in rows])
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(14, 3.8))
    blocks = [block_of(r["layer"]) for r in rows]
    starts = [i for i in range(len(rows)) if i == 0 or blocks[i] != blocks[i - 1]]
    every = max(1, len(starts) // 40)  # at most ~40 block labels
    for k, s in enumerate(starts):
        if k % 2:
            end = starts[k + 1] if k + 1 < len(starts) else len(rows)
            ax.axvspan(s - 0.5, end - 0.5, color="#f1f3f5", zorder=0)
        if k % every == 0:
            ax.text(s, 1.01, _short(blocks[s]), transform=ax.get_xaxis_transform(),
                    fontsize=7, rotation=90, va="bottom", color="#555")
    ax.axhline(1.0, color="#888", lw=1, ls="--", zorder=1)
    size = 28 if len(rows) < 150 else 10
    ax.scatter(x[~acc], ratio[~acc], s=size, facecolors="none", edgecolors="#9aa5b1",
               label="order rejected / no site (RTN)", zorder=2)
    ax.scatter(x[acc], ratio[acc], s=size, color="#1f77b4", label="accepted site", zorder=3)
    ax.set_yscale("log")
    _plain_log_ticks(ax.yaxis)
    ax.set_xlim(-1, max(len(rows), 1))
    ax.set_ylabel(f"error / {baseline} error")
    ax.set_xlabel("layer, in model order (blocks in execution order; shaded bands alternate)")
    ax.set_title(f"{method}: per-layer output error relative to {baseline} (below 1 = better)",
                 pad=30, loc="left", fontsize=10)
    ax.grid(axis="y", which="both", alpha=0.25)
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.07), ncol=2, fontsize=8, frameon=False)
    return figure_png(fig)


def group_ranges(absmax: np.ndarray, perm: np.ndarray | None, group: int) -> np.ndarray:
    """Per group of `group` consecutive channels (read in `perm` order): the dynamic range
    max / min of the channels' activation absmax, `(d // group,)`."""
    a = np.asarray(absmax, np.float64)
    if perm is not None:
        a = a[np.asarray(perm)]
    g = a[: len(a) // group * group].reshape(-1, group)
    return g.max(axis=1) / np.maximum(g.min(axis=1), 1e-12 * max(g.max(), 1e-30))


def channel_range_plot(absmax: np.ndarray, perm: np.ndarray, group: int, title: str) -> bytes:
    """Bars per quantization group: dynamic range of the channels' absmax in the original order
    against the permuted order (log scale); the loud channel sets the group's scale."""
    plt = pyplot()
    before, after = group_ranges(absmax, None, group), group_ranges(absmax, perm, group)
    x = np.arange(len(before))
    fig, ax = plt.subplots(figsize=(6.6, 2.9))
    w = 0.42
    ax.bar(x - w / 2, before, w, color="#c4cdd5",
           label=f"original order (median {np.median(before):.1f}x)")
    ax.bar(x + w / 2, after, w, color="#1f77b4",
           label=f"permuted (median {np.median(after):.1f}x)")
    ax.set_yscale("log")
    _plain_log_ticks(ax.yaxis)
    ax.set_xlabel(f"group of {group} channels")
    ax.set_ylabel("max / min channel |x|")
    ax.set_ylim(bottom=1.0)  # max / min >= 1 by definition
    ax.set_title(title, fontsize=9, loc="left", pad=22)
    if len(x) <= 24:
        ax.set_xticks(x)
    ax.legend(fontsize=7, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, frameon=False)
    ax.grid(axis="y", which="both", alpha=0.25)
    return figure_png(fig)
