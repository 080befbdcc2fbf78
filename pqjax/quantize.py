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
import math
import time
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from pqjax import formats
from pqjax.calibrate import Calibration, linears
from pqjax.layers import BACKENDS, QuantLinear, QuantState
from pqjax.methods import get_method, method_names
from pqjax.models.family import families
from pqjax.models.paths import module_at
from pqjax.permute.criteria import criterion_names
from pqjax.report import QuantReport

# Kept in 16-bit by default (what SVDQuant-style W4A4 deployments keep too): input and time
# embedders and the final projection, as every family record's `keep_16bit` lists them with
# its reasons. Patterns match dotted Linear paths (fnmatch).
DEFAULT_SKIP = tuple(dict.fromkeys(p for fam in families() for p, _ in fam.keep_16bit))


# acts="same" (the default): activations use the weights' format (and group).
SAME_AS_WEIGHTS = "same"

# Method options (`QuantConfig.options`) the built-in methods read, with the type each must
# have. A new method's option is added here, so a misspelt name is refused, not ignored.
OPTION_TYPES: dict[str, tuple[type, ...]] = {
    "alphas": (tuple, list),  # smoothquant/svdquant/ptq4dit: migration strengths in [0, 1]
    "block": (int, type(None)),  # hadamard/convrot: rotation block size
    "damp": (float, int),  # gptq: Hessian damping, a fraction of mean(diag H)
    "init": (float, int),  # omniquant_lwc: clipping logit at the start
    "lr": (float, int),  # omniquant_lwc: Adam learning rate
    "max_block": (int, type(None)),  # permuquant_h: widest rotation block among the candidates
    "permute": (bool,),  # gptq: also search permutations
    "rank": (int,),  # svdquant: low-rank branch rank
    "refine": (int,),  # permuquant_h/_hr: rounds of greedy swaps between groups
    "rotations": (str,),  # permuquant_h: "search" (joint choice), "rotated" or "fixed"
    "row_chunk": (int,),  # gptq: rows per Hessian update
    "seed": (int, type(None)),  # hadamard/convrot: random signs
    "steps": (int,),  # omniquant_lwc: optimisation steps
}


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)


def _check_options(options: Any) -> None:
    if not isinstance(options, tuple | list):
        raise ValueError(f"QuantConfig.options must be (name, value) pairs, got {options!r}")
    seen = set()
    for pair in options:
        if not (isinstance(pair, tuple | list) and len(pair) == 2 and isinstance(pair[0], str)):
            raise ValueError(f"QuantConfig.options: {pair!r} is not a (name, value) pair")
        name, value = pair
        if name in seen:
            raise ValueError(f"QuantConfig.options: {name!r} is given twice")
        seen.add(name)
        if name not in OPTION_TYPES:
            raise ValueError(
                f"QuantConfig.options: unknown option {name!r}; known: {sorted(OPTION_TYPES)}"
            )
        types = OPTION_TYPES[name]
        ok = isinstance(value, types) and (bool in types or not isinstance(value, bool))
        if ok and name == "alphas":
            ok = len(value) > 0 and all(_is_number(a) and 0 <= a <= 1 for a in value)
        elif ok and _is_number(value) and name != "permute":
            ok = math.isfinite(value) and (name in ("init", "seed", "refine") or value > 0)
            ok = ok and (name != "refine" or value >= 0)
        if not ok:
            want = "|".join(t.__name__ for t in types)
            raise ValueError(
                f"QuantConfig.options: {name}={value!r} is not a valid {want}"
                + (" (values in [0, 1])" if name == "alphas" else "")
            )


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
    `pqjax.permute.criterion_names()`; alpha in [0, 1] (or a tuple); options: method-specific
    (name, value) pairs, names and types from `OPTION_TYPES`. Every field is checked here.
    """

    weights: str | None = "nvfp4"
    acts: str | None = SAME_AS_WEIGHTS
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
        if self.acts == SAME_AS_WEIGHTS:
            object.__setattr__(self, "acts", self.weights)
        if self.backend not in BACKENDS:
            raise ValueError(f"QuantConfig.backend {self.backend!r}: choose one of {BACKENDS}")
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
        if self.method not in _registered_methods(self.method):
            raise ValueError(
                f"QuantConfig.method: unknown method {self.method!r}; choose from {method_names()}"
            )
        _check_names("criterion", self.criterion, criterion_names(), "criterion")
        _check_alpha(self.alpha)
        if not (_is_number(self.tau) and math.isfinite(self.tau)):
            raise ValueError(f"QuantConfig.tau must be a finite number, got {self.tau!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int | np.integer):
            raise ValueError(f"QuantConfig.seed must be an int, got {self.seed!r}")
        if isinstance(self.skip, str) or not all(isinstance(p, str) for p in self.skip):
            raise ValueError(f"QuantConfig.skip must be a tuple of patterns, got {self.skip!r}")
        _check_options(self.options)

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


def _registered_methods(name: str) -> list[str]:
    """The registered method names; the baselines are imported only for a name not yet known."""
    from pqjax.methods import _METHODS

    return list(_METHODS) if name in _METHODS else method_names()


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
    report = QuantReport.build(model, qmodel, config, plan, seconds, calib=calib)
    return qmodel, report
