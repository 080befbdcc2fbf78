"""The quantization report: per-layer errors before/after, site decisions, sizes, time.

report.save("out/")   # out/report.json and out/layer_errors.png (RTN vs the method)
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flax import nnx

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

    @classmethod
    def build(
        cls, model: nnx.Module, qmodel: nnx.Module, config: QuantConfig, plan: Plan, seconds: float
    ) -> QuantReport:
        layers = [{"layer": p, **row} for p, row in plan.layers.items()]
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
        )

    def to_dict(self) -> dict[str, Any]:
        """Everything but the permutations (those go to perms.npz)."""
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "perms"
        }

    def save(self, out_dir: str | Path, plot: bool = True) -> Path:
        """report.json, perms.npz (accepted orders per site) and layer_errors.png in out_dir."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(self.to_dict(), indent=2, default=float))
        if self.perms:
            np.savez_compressed(out / "perms.npz", **self.perms)
        if plot and self.layers:
            from pqjax.eval.plots import layer_error_bars

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
