"""The quantization report: per-layer errors before/after, site decisions, sizes, time.

report.save("out/")   # out/report.json, out/index.html (the page), out/layer_errors.png
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flax import nnx

from pqjax.eval.plots import block_of
from pqjax.layers import QuantLinear, QuantState
from pqjax.models.conv import Conv2d
from pqjax.models.layers import Linear

if TYPE_CHECKING:
    from pqjax.methods import Plan
    from pqjax.quantize import QuantConfig


def model_bytes(model: nnx.Module, bits_16: bool = True) -> dict[str, int]:
    """Storage of `model`: packed QuantLinear weights as stored, every other parameter at
    16 bits (bits_16) or its own dtype. Also the all-bf16 size of the same parameters."""
    quant = other = bf16 = 0
    for _, node in nnx.iter_graph(model):
        if isinstance(node, QuantLinear):
            quant += node.nbytes
            bf16 += 2 * node.in_features * node.out_features
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        v = var.get_value()
        other += v.size * (2 if bits_16 else v.dtype.itemsize)
        bf16 += 2 * v.size
    return {"quantized_bytes": quant + other, "bf16_bytes": bf16, "packed_weight_bytes": quant}


def kept_16bit(model: nnx.Module, skip: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """The weight layers of a quantized `model` left in 16-bit, each with the reason:
    Linears matching a `skip` pattern, and convolutions (never quantized; a depthwise conv
    is a per-channel filter, not a matmul)."""
    out = []
    for path, node in nnx.iter_graph(model):
        name = ".".join(str(p) for p in path)
        if isinstance(node, Linear):
            pat = next((p for p in skip if fnmatch.fnmatchcase(name, p)), None)
            reason = f"skip pattern {pat!r}" if pat else "not quantized by the method"
        elif isinstance(node, Conv2d):
            cout = node.kernel.shape[-1]
            depthwise = node.groups > 1 and node.groups == cout and node.kernel.shape[2] == 1
            reason = "depthwise conv (per-channel filter)" if depthwise else "convolution"
        else:
            continue
        out.append({"module": name, "reason": reason})
    return out


def versions() -> dict[str, str]:
    """The versions that made a report: pqjax, jax, jaxlib, flax, numpy and python."""
    from importlib import metadata

    out = {}
    for name in ("pqjax", "jax", "jaxlib", "flax", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["python"] = platform.python_version()
    return out


def model_order(model: nnx.Module) -> dict[str, int]:
    """Dotted path -> display position of every Linear / QuantLinear of `model`: blocks in
    the order the model's permutation sites declare them (execution order: FLUX's double
    blocks before its single blocks), layers within a block in site order; layers outside
    every site (embedders) first. Module-tree order when the model declares no sites."""
    from pqjax import permute

    paths = [
        ".".join(str(p) for p in path)
        for path, node in nnx.iter_graph(model)
        if isinstance(node, (Linear, QuantLinear))
    ]
    try:
        consumers = [c for site in permute.sites(model) for c in site.consumers]
    except (TypeError, AttributeError):  # no sites declared for this model
        return {p: i for i, p in enumerate(paths)}
    block_rank: dict[str, int] = {}
    rank: dict[str, int] = {}
    for c in consumers:
        block_rank.setdefault(block_of(c), len(block_rank))
        rank.setdefault(c, len(rank))

    def key(item: tuple[int, str]) -> tuple[int, int, int]:
        i, p = item
        b = block_rank.get(block_of(p), -1)
        return (b, rank.get(p, -1) if b >= 0 else i, i)

    ordered = sorted(enumerate(paths), key=key)
    return {p: k for k, (_, p) in enumerate(ordered)}


def channel_stats(
    plan: Plan, act_absmax: Mapping[str, Any], layers: list[dict[str, Any]], group: int,
    top: int = 4,
) -> list[dict[str, Any]]:
    """For the `top` accepted sites with the largest gain: the activation absmax per channel
    of the site's input `(dim,)` (calibrated absmax of its first consumer, `act_absmax` by
    layer path), to plot the groups before and after the permutation (the order itself is in
    `perms`)."""
    first = {}
    for row in layers:  # model order: the first consumer of each site
        if row.get("site") is not None:
            first.setdefault(row["site"], row["layer"])
    gains = []
    for site, row in plan.sites.items():
        e_id, e_perm = row.get("err_identity", 0.0), row.get("err_permuted", 0.0)
        if row.get("accepted") and site in plan.perms and first.get(site) in act_absmax \
                and e_id > 0:
            gains.append(((e_id - e_perm) / e_id, site))
    out = []
    for gain, site in sorted(gains, reverse=True)[:top]:
        absmax = np.asarray(act_absmax[first[site]], np.float64)
        out.append({"site": site, "consumer": first[site], "gain": float(gain), "group": group,
                    "kind": plan.sites[site].get("kind"), "act_absmax": absmax.tolist()})
    return out


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


@dataclasses.dataclass
class QuantReport:
    config: dict[str, Any]
    label: str
    method: str
    layers: list[dict[str, Any]]
    sites: list[dict[str, Any]]
    summary: dict[str, Any]
    sizes: dict[str, int]
    seconds: float
    perms: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)
    kept_16bit: list[dict[str, str]] = dataclasses.field(default_factory=list)  # see kept_16bit
    versions: dict[str, str] = dataclasses.field(default_factory=dict)  # see versions()
    channel_stats: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @classmethod
    def build(
        cls,
        qmodel: nnx.Module,
        config: QuantConfig,
        plan: Plan,
        seconds: float,
        act_absmax: Mapping[str, Any] | None = None,
    ) -> QuantReport:
        """The report of `qmodel` (real or abstract) quantized by `plan`'s rows (absolute
        paths). act_absmax: the calibrated input absmax per layer path; with it, the report
        keeps the channel statistics of the most improved sites (`channel_stats`)."""
        order = model_order(qmodel)
        layers = [{"layer": p, **row} for p, row in plan.layers.items()]
        layers.sort(key=lambda r: order.get(r["layer"], len(order)))  # model order
        sites = [{"site": s, **row} for s, row in plan.sites.items()]
        rtn = [r["err_rtn"] for r in layers if "err_rtn" in r]
        err = [r["err"] for r in layers if "err" in r]
        summary = {
            "n_layers": len(layers),
            "mean_err_rtn": _mean(rtn),
            "mean_err": _mean(err),
            "layers_not_worse_than_rtn": int(
                sum(r["err"] <= r["err_rtn"] for r in layers if "err" in r and "err_rtn" in r)
            ),
            "n_sites": len(sites),
            "sites_accepted": int(sum(bool(s.get("accepted")) for s in sites)),
        }
        cfg = {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(config).items()
        }
        fmt = config.act_format() or config.weight_format()
        group = (fmt.group_size if fmt is not None else None) or 16
        stats = [] if act_absmax is None else channel_stats(plan, act_absmax, layers, group)
        sizes = model_bytes(qmodel)
        sizes["compression_vs_bf16"] = sizes["bf16_bytes"] / max(sizes["quantized_bytes"], 1)
        return cls(
            cfg,
            config.label,
            config.method,
            layers,
            sites,
            summary,
            sizes,
            seconds,
            perms=dict(plan.perms),
            kept_16bit=kept_16bit(qmodel, tuple(config.skip)),
            versions=versions(),
            channel_stats=stats,
        )

    def to_dict(self) -> dict[str, Any]:
        """Everything but the permutations (those go to perms.npz)."""
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "perms"
        }

    def save(self, out_dir: str | Path, plot: bool = True) -> Path:
        """report.json, perms.npz (accepted orders per site), index.html (the report page, see
        `pqjax.eval.html`) and layer_errors.png in out_dir."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(self.to_dict(), indent=2, default=float))
        if self.perms:
            np.savez_compressed(out / "perms.npz", **self.perms)
        if plot and self.layers:
            from pqjax.eval.html import run_page, write_page
            from pqjax.eval.plots import layer_error_bars

            write_page(out / "index.html", run_page(self))
            layer_error_bars(
                self.layers,
                out / "layer_errors.png",
                title=f"{self.label}: per-layer error, RTN vs {self.method}",
                method=self.method,
            )
        return out / "report.json"

    @classmethod
    def load(cls, path: str | Path) -> QuantReport:
        """From a report.json (and the perms.npz beside it, if any)."""
        path = Path(path)
        report = cls(**json.loads(path.read_text()))
        if (path.parent / "perms.npz").is_file():
            with np.load(path.parent / "perms.npz") as z:
                report.perms = {k: z[k] for k in z.files}
        return report


__all__ = ["QuantReport", "QuantState", "kept_16bit", "model_bytes"]
