"""Model-level post-training quantization: `pqjax.quantize(model, calib, QuantConfig(...))`.

    calib = pqjax.calibrate(model, batches)
    qmodel, report = pqjax.quantize(model, calib, QuantConfig(weights="nvfp4", acts="nvfp4"))
    report.save("out/")        # report.json + per-layer error bar plot

Linears matching `config.skip` (embedders and the final projection by default) stay in full
precision; every other Linear becomes a QuantLinear holding its packed weight.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import time
from typing import Any

import jax.numpy as jnp
from flax import nnx

from pqjax import formats
from pqjax.calibrate import Calibration, linears
from pqjax.layers import BACKENDS, QuantLinear, QuantState
from pqjax.methods import get_method
from pqjax.permute.absorb import module_at
from pqjax.report import QuantReport

# Kept in 16-bit by default (what SVDQuant-style W4A4 deployments keep too): input and time
# embedders and the final projection. Patterns match dotted Linear paths (fnmatch).
DEFAULT_SKIP = (
    "x_embedder",
    "context_embedder",
    "time_text_embed.*",
    "norm_out.*",
    "proj_out",
    "patch_embed.*",
    "caption_projection.*",
    "time_embed.*",
    "t_embedder.*",
    "cap_embedder.*",
    "all_x_embedder.*",
    "all_final_layer.*",
    "final_layer.*",
)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how. weights/acts: a format name from `pqjax.formats` or None
    (16-bit); group: group size for INT formats (None: the format's default)."""

    weights: str | None = "nvfp4"
    acts: str | None = "nvfp4"
    group: int | None = None
    method: str = "permuquant"
    criterion: str | tuple[str, ...] = "joint_second_moment"
    alpha: float | tuple[float, ...] = 0.5
    tau: float = 0.0
    skip: tuple[str, ...] = DEFAULT_SKIP
    backend: str = "xla"
    seed: int = 0
    options: tuple[tuple[str, Any], ...] = ()  # method-specific, e.g. (("rank", 32),)
    progress: bool = True

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"QuantConfig.backend {self.backend!r}: choose one of {BACKENDS}")
        if self.weights is None and self.acts is None:
            raise ValueError("QuantConfig: weights and acts are both None; nothing to quantize")
        self.weight_format()
        self.act_format()

    def _format(self, name: str | None) -> formats.Format | None:
        if name is None:
            return None
        fmt = formats.get(name)
        if self.group is not None and isinstance(fmt, formats.IntFormat):
            fmt = formats.get(name, group=self.group)
        return fmt

    def weight_format(self) -> formats.Format | None:
        return self._format(self.weights)

    def act_format(self) -> formats.Format | None:
        return self._format(self.acts)

    def option(self, name: str, default: Any = None) -> Any:
        return dict(self.options).get(name, default)

    @property
    def label(self) -> str:
        """e.g. 'W4A4 nvfp4', 'W3A3 int3 g64', 'W4A16 int4 g128'."""
        wf, af = self.weight_format(), self.act_format()
        bits = {"nvfp4": 4, "mxfp4": 4, "fp8": 8}

        def nbits(f):
            return 16 if f is None else bits.get(f.name, getattr(f, "bits", 0))

        name = (wf or af).name
        group = (wf or af).group_size
        g = f" g{group}" if isinstance(wf or af, formats.IntFormat) and group else ""
        return f"W{nbits(wf)}A{nbits(af)} {name}{g}"


def is_skipped(path: str, config: QuantConfig) -> bool:
    """True if the Linear at dotted `path` stays in full precision under `config.skip`."""
    return any(fnmatch.fnmatchcase(path, pat) for pat in config.skip)


def quantizable(model: nnx.Module, config: QuantConfig) -> list[str]:
    """Dotted paths of the Linears that `config` quantizes."""
    return [p for p, _ in linears(model) if not is_skipped(p, config)]


def set_module(model: nnx.Module, path: str, new: nnx.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = module_at(model, parent_path) if parent_path else model
    if name.isdigit():
        parent[int(name)] = new
    else:
        setattr(parent, name, new)


def quantize(
    model: nnx.Module, calib: Calibration, config: QuantConfig | None = None
) -> tuple[nnx.Module, QuantReport]:
    """Quantize `model` (unchanged) with `config.method`; returns (quantized model, report)."""
    config = config or QuantConfig()
    t0 = time.perf_counter()
    targets = quantizable(model, config)
    if not targets:
        raise ValueError(f"no Linear layer left to quantize after skip patterns {config.skip}")
    plan = get_method(config.method)(model, calib, config, targets)
    qmodel = plan.model
    wfmt, afmt = config.weight_format(), config.act_format()
    for path in targets:
        lin = module_at(qmodel, path)
        stats = calib.get(path)
        amax = None if stats is None else jnp.max(stats.absmax)
        if wfmt is None:  # activation-only quantization keeps an unquantized weight
            raise NotImplementedError("weights=None (activation-only) is not supported yet")
        try:
            q = QuantLinear.from_linear(
                lin,
                weights=wfmt,
                acts=afmt,
                act_amax=amax,
                backend=config.backend,
                kernel=plan.kernels.get(path),
            )
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
        if path in plan.qweights:
            qt = plan.qweights[path]
            q.codes[...], q.block_scale[...] = qt.codes, qt.block_scale
            if qt.global_scale is not None:
                q.global_scale[...] = qt.global_scale
            if qt.zero_point is not None:
                q.zero_point[...] = qt.zero_point
        extras = plan.extras.get(path, {})
        unknown = set(extras) - {"low_rank", "input_scale", "input_transform"}
        if unknown:
            raise ValueError(f"{config.method}: unknown extras {sorted(unknown)} for {path}")
        if "low_rank" in extras:
            down, up = extras["low_rank"]
            q.low_rank_down, q.low_rank_up = QuantState(down), QuantState(up)
        if "input_scale" in extras:
            q.input_scale = QuantState(jnp.asarray(extras["input_scale"], q.dtype))
        q.input_transform = extras.get("input_transform")
        bad = q.nonfinite_state()
        if bad:  # one NaN scale or bias makes every output of the model NaN
            raise ValueError(f"{path}: the quantized layer's {', '.join(bad)} hold NaN or Inf")
        set_module(qmodel, path, q)
    seconds = time.perf_counter() - t0
    report = QuantReport.build(model, qmodel, config, plan, seconds)
    return qmodel, report
