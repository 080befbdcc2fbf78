"""The quantization config, and the one place a method's Plan becomes quantized layers.

    config = QuantConfig(weights="int4", group=64, method="permuquant")   # checked when built
    qmodel = apply_plan(plan, calib, config, targets)       # every Linear at targets -> QuantLinear

Linears matching `config.skip` (embedders and the final projection by default) stay in full
precision; every other Linear becomes a QuantLinear holding its packed weight. `pqjax.quantize`
(in `pqjax.engine`) runs a method block by block and applies each block's Plan here; restoring a
checkpoint builds the same layers from their recorded layout (`pqjax.checkpoint_layout`).
Runtime switches (progress bars, the kernel backend) are arguments of the calls, not config.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from pqjax import formats
from pqjax.calibrate import Calibration, linears
from pqjax.layers import QuantLinear, QuantState
from pqjax.methods import Plan, method_spec
from pqjax.models.family import families
from pqjax.models.paths import module_at
from pqjax.permute.criteria import criterion_names

# Kept in 16-bit by default (what SVDQuant-style W4A4 deployments keep too): input and time
# embedders and the final projection, as every family record's `keep_16bit` lists them with
# its reasons. Patterns match dotted Linear paths (fnmatch).
DEFAULT_SKIP = tuple(dict.fromkeys(p for fam in families() for p, _ in fam.keep_16bit))


# acts="same" (the default): activations use the weights' format (and group).
SAME_AS_WEIGHTS = "same"

def _is_number(v: Any) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)


def _check_names(field: str, value: Any, known: list[str], what: str) -> None:
    names = (value,) if isinstance(value, str) else value
    if (
        not isinstance(names, tuple | list)
        or not names
        or not all(isinstance(n, str) for n in names)
    ):
        raise ValueError(f"QuantConfig.{field} must be a {what} name or a tuple of them")
    for n in names:
        if n not in known:
            raise ValueError(f"QuantConfig.{field}: unknown {what} {n!r}; choose from {known}")


def _check_alpha(alpha: Any) -> None:
    values = (alpha,) if _is_number(alpha) else alpha
    if (
        not isinstance(values, tuple | list)
        or not values
        or not all(_is_number(a) and 0 <= a <= 1 for a in values)
    ):
        raise ValueError(
            f"QuantConfig.alpha must be a number in [0, 1] or a tuple of them, got {alpha!r}"
        )


def _group_of(fmt: formats.Format) -> str:
    g = fmt.group_size
    return f" g{g}" if isinstance(fmt, formats.IntFormat) and g else ""


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how.

    weights/acts: a format name from `pqjax.formats` or None (16-bit); acts="same" (the
    default) uses the weights' format. group: group size for INT formats (None: the format's
    default); formats with a fixed group (nvfp4 16, mxfp4 32, fp8, quartz) refuse one.
    method: a name from `pqjax.method_names()`; criterion: a name (or tuple of names) from
    `pqjax.permute.criterion_names()`; alpha in [0, 1] (or a tuple); options: (name, value)
    pairs of the method's own options (`pqjax.methods.method_spec(method).options`, each with
    its type and default). Every field is checked here, the options against the method's
    declaration and the formats against what the method can do, before any work.
    """

    weights: str | None = "nvfp4"
    acts: str | None = SAME_AS_WEIGHTS
    group: int | None = None
    method: str = "permuquant"
    criterion: str | tuple[str, ...] = "joint_second_moment"
    alpha: float | tuple[float, ...] = 0.5
    tau: float = 0.0
    skip: tuple[str, ...] = DEFAULT_SKIP
    seed: int = 0
    options: tuple[tuple[str, Any], ...] = ()  # the method's, e.g. (("rank", 32),)

    def __post_init__(self):
        if self.acts == SAME_AS_WEIGHTS:
            object.__setattr__(self, "acts", self.weights)
        if self.weights is None and self.acts is None:
            raise ValueError("QuantConfig: weights and acts are both None; nothing to quantize")
        if self.group is not None:
            sides = [formats.get(n) for n in dict.fromkeys((self.weights, self.acts)) if n]
            if not any(isinstance(f, formats.IntFormat) for f in sides):
                fixed = " and ".join(
                    f"{f.name} has "
                    + (f"a fixed group of {f.group_size}" if f.group_size else "no group")
                    for f in sides
                )
                raise ValueError(
                    f"QuantConfig.group={self.group!r}: only INT formats take a group size; "
                    f"{fixed} (leave group unset)"
                )
        self.weight_format()
        self.act_format()
        if not isinstance(self.method, str):
            raise ValueError(f"QuantConfig.method must be a method name, got {self.method!r}")
        try:
            spec = method_spec(self.method)
        except ValueError as e:
            raise ValueError(f"QuantConfig.method: {e}") from None
        _check_names("criterion", self.criterion, criterion_names(), "criterion")
        _check_alpha(self.alpha)
        if not (_is_number(self.tau) and math.isfinite(self.tau)):
            raise ValueError(f"QuantConfig.tau must be a finite number, got {self.tau!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int | np.integer):
            raise ValueError(f"QuantConfig.seed must be an int, got {self.seed!r}")
        if isinstance(self.skip, str) or not all(isinstance(p, str) for p in self.skip):
            raise ValueError(f"QuantConfig.skip must be a tuple of patterns, got {self.skip!r}")
        spec.check_options(self.options)
        if spec.check is not None:
            spec.check(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> QuantConfig:
        """From its JSON form (`dataclasses.asdict`, lists for tuples); the runtime switches
        older pqjax kept here (backend, progress) are dropped."""
        fields = {}
        for key, value in raw.items():
            if key in ("backend", "progress"):
                continue
            if key == "options":
                value = tuple(tuple(pair) for pair in value)
            elif isinstance(value, list):
                value = tuple(value)
            fields[key] = value
        return cls(**fields)

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
        """The value of the method's option `name`: as given, else the method's declared
        default (else `default`)."""
        given = dict(self.options)
        if name in given:
            return given[name]
        declared = method_spec(self.method).options.get(name)
        return default if declared is None else declared.default

    @property
    def label(self) -> str:
        """What is used: 'W4A4 nvfp4', 'W3A3 int3 g64', 'W4A16 int4 g128', and for a mix
        of formats both, weights' first: 'W4A4 int4 g64 + nvfp4 acts'."""
        wf, af = self.weight_format(), self.act_format()
        bits = {"nvfp4": 4, "mxfp4": 4, "fp8": 8}

        def nbits(f):
            return 16 if f is None else bits.get(f.name, getattr(f, "bits", 0))

        def desc(f):
            return f"{f.name}{_group_of(f)}"

        head = f"W{nbits(wf)}A{nbits(af)}"
        if wf is None or af is None or desc(wf) == desc(af):
            return f"{head} {desc(wf or af)}"
        return f"{head} {desc(wf)} + {desc(af)} acts"


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


def apply_plan(plan: Plan, calib: Calibration, config: QuantConfig, targets: list[str]
               ) -> nnx.Module:
    """Turn `plan` into quantized layers: every Linear at `targets` of `plan.model` becomes a
    QuantLinear of `config`'s formats, with the plan's replacement kernel, pre-rounded weight
    and extras; the activation global scale comes from the calibrated absmax (`calib`, paths
    as in `plan.model`), or from the plan's "act_amax" where it rotates the input. Returns
    `plan.model`, changed in place. The only place a Linear is quantized."""
    qmodel = plan.model
    wfmt, afmt = config.weight_format(), config.act_format()
    if wfmt is None:  # activation-only quantization keeps an unquantized weight
        raise NotImplementedError("weights=None (activation-only) is not supported yet")
    for path in targets:
        lin = module_at(qmodel, path)
        stats = calib.get(path)
        extras = plan.extras.get(path, {})
        amax = None if stats is None else extras.get("act_amax", jnp.max(stats.absmax))
        try:
            q = QuantLinear.from_linear(
                lin, weights=wfmt, acts=afmt, act_amax=amax, kernel=plan.kernels.get(path)
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
        unknown = set(extras) - {"low_rank", "input_scale", "input_transform", "act_amax",
                                 "bias_correction"}
        if unknown:
            raise ValueError(f"{config.method}: unknown extras {sorted(unknown)} for {path}")
        if "low_rank" in extras:
            down, up = extras["low_rank"]
            q.low_rank_down, q.low_rank_up = QuantState(down), QuantState(up)
        if "input_scale" in extras:
            q.input_scale = QuantState(jnp.asarray(extras["input_scale"], q.dtype))
        q.input_transform = extras.get("input_transform")
        if "bias_correction" in extras:  # the layer's mean output error on calibration rows
            if q.bias is None:
                raise ValueError(f"{config.method}: a bias correction for {path}, which has "
                                 "no bias")
            bias = q.bias[...]
            q.bias[...] = (bias.astype(jnp.float32)
                           - jnp.asarray(extras["bias_correction"], jnp.float32)).astype(bias.dtype)
        bad = q.nonfinite_state()
        if bad:  # one NaN scale or bias makes every output of the model NaN
            raise ValueError(f"{path}: the quantized layer's {', '.join(bad)} hold NaN or Inf")
        set_module(qmodel, path, q)
    return qmodel
