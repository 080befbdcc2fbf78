"""Save and restore a (quantized) pipeline with orbax, atomically; restore needs no torch.

    pqjax.save(pipe, "out/q")     # out/q/pqjax_checkpoint.json, transformer/ (orbax), ...
    pipe = pqjax.restore("out/q")

The transformer's state (packed codes, scales in their own dtypes, absorbed permutations,
16-bit parameters) goes through orbax; `pqjax_checkpoint.json` records the model config, the
quantization config and the quantized layout, from which restore builds the abstract target.
A checkpoint whose arrays differ in dtype or shape from that target is refused, never cast.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert import registry
from pqjax import formats
from pqjax.layers import QuantLinear, QuantState
from pqjax.models.layers import Linear, Permutation
from pqjax.permute.absorb import module_at
from pqjax.pipelines.flow import FlowMatchEuler
from pqjax.pipelines.pipeline import Pipeline, SamplingDefaults
from pqjax.quantize import QuantConfig, set_module

FORMAT_VERSION = 1
META = "pqjax_checkpoint.json"


class CheckpointError(ValueError):
    """A checkpoint folder that is not what it claims to be (names the file or key)."""


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("pqjax", "jax", "jaxlib", "flax", "orbax-checkpoint"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def format_spec(fmt: formats.Format | None) -> dict[str, Any] | None:
    if fmt is None:
        return None
    spec = {"name": fmt.name}
    for key in ("group", "scaling"):
        if hasattr(fmt, key):
            spec[key] = getattr(fmt, key)
    return spec


def format_from_spec(spec: dict[str, Any] | None) -> formats.Format | None:
    if spec is None:
        return None
    return formats.get(spec["name"], **{k: v for k, v in spec.items() if k != "name"})


def module_layout(model: nnx.Module) -> tuple[dict[str, Any], dict[str, int]]:
    """(quantized layers, absorbed norm permutations) of `model`, by dotted path: what an
    abstract twin needs to hold the same state."""
    layers, perms = {}, {}
    for path, node in nnx.iter_graph(model):
        name = ".".join(str(p) for p in path)
        if isinstance(node, QuantLinear):
            layers[name] = {
                "in_features": node.in_features,
                "out_features": node.out_features,
                "bias": node.bias is not None,
                "dtype": jnp.dtype(node.dtype).name,
                "weights": format_spec(node.weight_fmt),
                "acts": format_spec(node.act_fmt),
                "act_global_scale": node.act_global_scale is not None,
                "input_scale": node.input_scale is not None,
                "low_rank": None
                if node.low_rank_down is None
                else int(node.low_rank_down.get_value().shape[1]),
                "input_transform": node.input_transform,
            }
        elif getattr(node, "perm", None) is not None and isinstance(node.perm, Permutation):
            perms[name] = int(node.perm.shape[0])
    return layers, perms


def state_dict(model: nnx.Module) -> dict[str, Any]:
    return nnx.to_pure_dict(nnx.state(model))


def save(pipe: Pipeline, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write `pipe` to `out_dir` atomically (temporary folder, then rename)."""
    import orbax.checkpoint as ocp

    out = Path(out_dir).resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        model = pipe.transformer
        spec = registry.spec_for_model(model)
        layers, perms = module_layout(model)
        first = next(iter(nnx.to_flat_state(nnx.state(model, nnx.Param))))[1].get_value()
        meta = {
            "format_version": FORMAT_VERSION,
            "versions": _versions(),
            "source": pipe.source,
            "transformer": {
                "class_name": spec.class_name,
                "config": spec.dump(model.config),
                "dtype": jnp.dtype(first.dtype).name,
            },
            "quant_config": None
            if pipe.quant_config is None
            else dataclasses.asdict(pipe.quant_config),
            "quantized_layers": layers,
            "norm_perms": perms,
            "pipeline": {
                "text_encoder": _component_name(pipe.text_encoder),
                "decoder": _component_name(pipe.decoder),
                "defaults": dataclasses.asdict(pipe.defaults),
                "scheduler": dataclasses.asdict(pipe.scheduler),
            },
        }
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / "transformer", state_dict(model))
        ckptr.wait_until_finished()
        pipe.text_encoder.save(tmp / "text_encoder")
        pipe.decoder.save(tmp / "decoder")
        if pipe.report is not None:
            pipe.report.save(tmp / "report")
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _abstract_transformer(meta: dict[str, Any], source: str) -> nnx.Module:
    tmeta = meta["transformer"]
    spec = registry.spec_for_class_name(tmeta["class_name"], source)
    config = spec.parse(tmeta["config"], source)
    dtype = jnp.dtype(tmeta["dtype"])
    model = nnx.eval_shape(lambda: spec.module(config, dtype=dtype, rngs=nnx.Rngs(0)))
    return apply_layout(model, meta["quantized_layers"], meta["norm_perms"])


def apply_layout(model: nnx.Module, layers: dict[str, Any], perms: dict[str, int]) -> nnx.Module:
    """Give an abstract full-precision `model` the structure `module_layout` recorded."""
    for path, dim in perms.items():
        module_at(model, path).perm = Permutation(jax.ShapeDtypeStruct((dim,), jnp.int32))
    for path, lay in layers.items():
        set_module(model, path, _abstract_quant_linear(lay))
    return model


def _abstract_quant_linear(lay: dict[str, Any]) -> QuantLinear:
    wfmt, afmt = format_from_spec(lay["weights"]), format_from_spec(lay["acts"])
    dtype = jnp.dtype(lay["dtype"])

    def build() -> QuantLinear:
        lin = Linear(
            lay["in_features"],
            lay["out_features"],
            use_bias=lay["bias"],
            dtype=dtype,
            rngs=nnx.Rngs(0),
        )
        q = QuantLinear.from_linear(
            lin, weights=wfmt, acts=afmt, act_amax=1.0 if lay["act_global_scale"] else None
        )
        if lay["input_scale"]:
            q.input_scale = QuantState(jnp.zeros((lay["in_features"],), dtype))
        if lay["low_rank"]:
            r = lay["low_rank"]
            q.low_rank_down = QuantState(jnp.zeros((lay["in_features"], r), dtype))
            q.low_rank_up = QuantState(jnp.zeros((r, lay["out_features"]), dtype))
        return q

    q = nnx.eval_shape(build)
    q.input_transform = lay["input_transform"]
    return q


def _flat(tree: Any) -> dict[str, Any]:
    """Leaves by dotted path; orbax stores integer (list-index) keys as strings."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)] = leaf
    return out


def _check_against_target(ckpt_meta: Any, target: dict[str, Any], where: Path) -> None:
    """Refuse arrays whose shape or dtype differ from the layout the metadata records."""
    stored, wanted = _flat(ckpt_meta), _flat(target)
    for key, want in wanted.items():
        got = stored.get(key)
        if got is None:
            raise CheckpointError(f"{where}: no array for {key}")
        if tuple(got.shape) != tuple(want.shape) or np.dtype(got.dtype) != np.dtype(want.dtype):
            raise CheckpointError(
                f"{where}: {key} is {np.dtype(got.dtype)} {tuple(got.shape)}, the recorded layout "
                f"expects {np.dtype(want.dtype)} {tuple(want.shape)}"
            )
    extra = sorted(set(stored) - set(wanted))
    if extra:
        raise CheckpointError(f"{where}: arrays the recorded layout does not know: {extra[:5]}")


def save_state(model: nnx.Module, path: Path) -> None:
    """Orbax-save `model`'s state to `path` (written to a temporary name, then renamed)."""
    import orbax.checkpoint as ocp

    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp, state_dict(model))
    ckptr.wait_until_finished()
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def restore_state(abstract: nnx.Module, where: Path) -> nnx.Module:
    """Fill the abstract `abstract` from an orbax state at `where`; refuses dtype/shape drift."""
    import orbax.checkpoint as ocp

    graphdef, state = nnx.split(abstract)
    target = nnx.to_pure_dict(state)
    ckptr = ocp.StandardCheckpointer()
    try:
        stored = ckptr.metadata(where)
        stored = getattr(stored, "item_metadata", stored)
        _check_against_target(stored, target, where)
        values = ckptr.restore(where, target)
    except CheckpointError:
        raise
    except Exception as e:  # orbax raises many types for missing or damaged files
        raise CheckpointError(f"{where}: cannot be read ({type(e).__name__}: {e})") from e
    nnx.replace_by_pure_dict(state, values)
    return nnx.merge(graphdef, state)


def restore(ckpt_dir: str | os.PathLike, *, backend: str = "xla") -> Pipeline:
    """Rebuild a pipeline saved by `save` (no torch, diffusers or original weights needed)."""
    from pqjax.layers import set_backend
    from pqjax.report import QuantReport

    root = Path(ckpt_dir).expanduser().resolve()  # orbax reads no metadata from relative paths
    meta_path = root / META
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{root} is not a pqjax checkpoint: {META} is missing") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_path}: corrupted ({e})") from e
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path}: format_version {meta.get('format_version')!r}, "
            f"this pqjax reads {FORMAT_VERSION}"
        )
    model = restore_state(_abstract_transformer(meta, str(meta_path)), root / "transformer")
    set_backend(model, backend)
    p = meta["pipeline"]
    qc = meta["quant_config"]
    config = None if qc is None else _quant_config(qc)
    report_path = root / "report" / "report.json"
    report = QuantReport.load(report_path) if report_path.is_file() else None
    return Pipeline(
        transformer=model,
        text_encoder=_component(p["text_encoder"]).load(root / "text_encoder"),
        scheduler=FlowMatchEuler(**p["scheduler"]),
        decoder=_component(p["decoder"]).load(root / "decoder"),
        defaults=SamplingDefaults(**p["defaults"]),
        source=meta["source"],
        quant_config=config,
        report=report,
    )


def _quant_config(raw: dict[str, Any]) -> QuantConfig:
    """QuantConfig from its JSON form (lists back to tuples, options to pairs)."""
    fields = {}
    for key, value in raw.items():
        if key == "options":
            value = tuple(tuple(pair) for pair in value)
        elif isinstance(value, list):
            value = tuple(value)
        fields[key] = value
    return QuantConfig(**fields)


# Pipeline components a checkpoint can hold: name -> "module:class" with save/load(folder).
COMPONENTS = {
    "PromptTable": "pqjax.models.text_table:PromptTable",
    "FluxTextEncoders": "pqjax.pipelines.flux:FluxTextEncoders",
    "IdentityDecoder": "pqjax.pipelines.pipeline:IdentityDecoder",
    "VAEDecoder": "pqjax.pipelines.flux:VAEDecoder",
}


def _component_name(obj: Any) -> str:
    name = type(obj).__name__
    if name not in COMPONENTS:
        raise TypeError(
            f"cannot save a pipeline component of type {name}; known: {sorted(COMPONENTS)}"
        )
    return name


def _component(name: str) -> Any:
    import importlib

    if name not in COMPONENTS:
        raise CheckpointError(f"pipeline component {name!r} cannot be restored by this pqjax")
    module, cls = COMPONENTS[name].split(":")
    return getattr(importlib.import_module(module), cls)
