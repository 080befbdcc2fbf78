"""Plots people would rather look at than read: per-layer errors and image grids."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def layer_error_bars(
    layers: Sequence[dict[str, Any]], path: str | Path, title: str, method: str = "method"
) -> Path:
    """Grouped bars of each layer's relative output error: RTN against `method` (log scale)."""
    plt = _pyplot()
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
    plt = _pyplot()
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
