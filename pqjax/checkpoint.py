"""Save and restore a (quantized) pipeline with orbax, atomically; restore needs no torch.

    pqjax.save(pipe, "out/q")     # out/q/pqjax_checkpoint.json, transformer/ (orbax), ...
    pipe = pqjax.restore("out/q")

The transformer's state (packed codes, scales in their own dtypes, absorbed permutations,
16-bit parameters) goes through orbax; `pqjax_checkpoint.json` records the model config, the
quantization config and the quantized layout, from which restore builds the abstract target.
A checkpoint whose arrays differ in dtype or shape from that target is refused, never cast.

Integrity: `checksums.json` (written last) records the size and sha256 of every file and the
sha256 of every transformer array. Restore verifies every file before reading any, and names
the damaged or missing file and the arrays it changed; a damaged optional report is dropped
with a warning. An existing checkpoint is replaced atomically (`pqjax.atomic_dir`); a folder
that is not a pqjax checkpoint is never replaced.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from convert import registry
from pqjax import checksums
from pqjax.atomic_dir import clean_leftovers, leftovers, replace_dir, temp_sibling
from pqjax.checkpoint_layout import apply_layout, check_against_target, flat, module_layout
from pqjax.errors import CheckpointError  # the one class convert raises too
from pqjax.pipelines.flow import FlowMatchEuler
from pqjax.pipelines.pipeline import Pipeline, SamplingDefaults
from pqjax.quantize import QuantConfig

FORMAT_VERSION = 2  # 2: checksums.json; version 1 (no checksums) is read with a warning
META = "pqjax_checkpoint.json"
OPTIONAL = ("report/",)  # derived files: damaged ones are dropped with a warning


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("pqjax", "jax", "jaxlib", "flax", "orbax-checkpoint"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def state_dict(model: nnx.Module) -> dict[str, Any]:
    return nnx.to_pure_dict(nnx.state(model))


def save(pipe: Pipeline, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write `pipe` to `out_dir` atomically: into a temporary sibling folder, checksummed,
    then renamed in. overwrite: replace an existing pqjax checkpoint (never another folder)."""
    import orbax.checkpoint as ocp

    out = Path(out_dir).resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    if out.exists():
        _check_replaceable(out)
    clean_leftovers(out)
    tmp = temp_sibling(out)
    tmp.mkdir(parents=True)
    try:
        from pqjax.pipelines.components import held

        model = held(pipe.transformer)  # a transformer kept on disk is read to be saved
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
            "pipeline": _pipeline_meta(pipe),
        }
        state = state_dict(model)
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / "transformer", state)
        ckptr.wait_until_finished()
        if hasattr(pipe, "save_parts"):  # SANA, Z-Image: the pipeline writes its own parts
            pipe.save_parts(tmp / "pipeline")
        else:
            pipe.text_encoder.save(tmp / "text_encoder")
            pipe.decoder.save(tmp / "decoder")
        if pipe.report is not None:
            pipe.report.save(tmp / "report")
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        digests = {k: checksums.array_sha256(v) for k, v in flat(jax.device_get(state)).items()}
        checksums.write(tmp, {"transformer": digests})  # last: a folder with it is complete
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_replaceable(out: Path) -> None:
    """Refuse to replace anything but a pqjax checkpoint (or an empty folder)."""
    if not out.is_dir():
        raise CheckpointError(f"{out} is a file, not a pqjax checkpoint; refusing to replace it")
    if not (out / META).is_file() and any(out.iterdir()):
        raise CheckpointError(
            f"{out} is not a pqjax checkpoint (no {META}); refusing to replace it, which "
            "would delete its files"
        )


def _abstract_transformer(meta: dict[str, Any], source: str) -> nnx.Module:
    tmeta = meta["transformer"]
    spec = registry.spec_for_class_name(tmeta["class_name"], source)
    config = spec.parse(tmeta["config"], source)
    dtype = jnp.dtype(tmeta["dtype"])
    model = nnx.eval_shape(lambda: spec.module(config, dtype=dtype, rngs=nnx.Rngs(0)))
    return apply_layout(model, meta["quantized_layers"], meta["norm_perms"])


def save_state(model: nnx.Module, path: Path) -> None:
    """Orbax-save `model`'s state to `path` (written to a temporary name, then renamed)."""
    import orbax.checkpoint as ocp

    tmp = temp_sibling(path)
    try:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp, state_dict(model))
        ckptr.wait_until_finished()
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_state(abstract: nnx.Module, where: Path) -> tuple[Any, dict[str, Any], Any]:
    """(graphdef, state, restored pure dict) of the orbax state at `where`."""
    import orbax.checkpoint as ocp

    if not (where / "manifest.ocdbt").is_file():
        raise CheckpointError(f"{where / 'manifest.ocdbt'} is missing: no arrays can be read")
    graphdef, state = nnx.split(abstract)
    target = nnx.to_pure_dict(state)
    ckptr = ocp.StandardCheckpointer()
    try:
        stored = ckptr.metadata(where)
        stored = getattr(stored, "item_metadata", stored)
        check_against_target(stored, target, where)
        values = ckptr.restore(where, target)
    except CheckpointError:
        raise
    except Exception as e:  # orbax raises many types, with a TensorStore spec as the message
        first = (str(e).strip().splitlines() or [""])[0].split(" See full TensorStore")[0]
        first = first[:200]
        raise CheckpointError(f"{where}: cannot be read ({type(e).__name__}: {first})") from e
    return graphdef, state, values


def restore_state(abstract: nnx.Module, where: Path) -> nnx.Module:
    """Fill the abstract `abstract` from an orbax state at `where`; refuses dtype/shape drift."""
    graphdef, state, values = _read_state(abstract, where)
    nnx.replace_by_pure_dict(state, values)
    return nnx.merge(graphdef, state)


def restore(ckpt_dir: str | os.PathLike, *, backend: str = "xla",
            max_memory: int | str | None = None) -> Pipeline:
    """Rebuild a pipeline saved by `save` (no torch, diffusers or original weights needed).

    Every file is checked against checksums.json first: a missing or damaged file is a
    CheckpointError naming it (and the transformer arrays it changed), before anything loads.
    max_memory (bytes, or e.g. "16GiB"): where all weights exceed it, the text encoders stay
    on disk and load for each encoding only (`pqjax.pipelines.components.OnDemand`).
    """
    from pqjax.backends import set_backend
    from pqjax.pipelines.components import encoders_on_demand, parse_bytes, tree_bytes

    parse_bytes(max_memory)  # refused before anything is read
    root = Path(ckpt_dir).expanduser().resolve()  # orbax reads no metadata from relative paths
    meta = _read_meta(root)
    abstract = _abstract_transformer(meta, str(root / META))
    dropped = _verify(root, meta, abstract)
    model = restore_state(abstract, root / "transformer")
    set_backend(model, backend)
    p = meta["pipeline"]
    qc = meta["quant_config"]
    config = None if qc is None else QuantConfig.from_dict(qc)
    report = None if dropped else _load_report(root / "report" / "report.json")
    if "kind" in p:  # SANA, Z-Image: the pipeline reads its own parts
        return _component(p["kind"]).load_parts(root / "pipeline", model, source=meta["source"],
                                                quant_config=config, report=report,
                                                max_memory=max_memory)
    decoder = _component(p["decoder"]).load(root / "decoder")
    encoders = _component(p["text_encoder"])
    kw = {}
    if hasattr(encoders, "ENCODER_FOLDERS"):  # FLUX's CLIP + T5 (the prompt table is tiny)
        kw["on_demand"] = encoders_on_demand(
            root / "text_encoder", encoders.ENCODER_FOLDERS, (), dtype=None,
            max_memory=max_memory,
            extra_bytes=tree_bytes(model) + tree_bytes(getattr(decoder, "vae", None)))
    return Pipeline(
        transformer=model,
        text_encoder=encoders.load(root / "text_encoder", **kw),
        scheduler=FlowMatchEuler(**p["scheduler"]),
        decoder=decoder,
        defaults=SamplingDefaults(**p["defaults"]),
        source=meta["source"],
        quant_config=config,
        report=report,
    )


def _read_meta(root: Path) -> dict[str, Any]:
    meta_path = root / META
    if not root.exists():
        raise CheckpointError(f"{root} does not exist{_interrupted(root)}")
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{root} is not a pqjax checkpoint: {META} is missing") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path}: corrupted ({e})") from e
    if not isinstance(meta, dict) or meta.get("format_version") not in (1, FORMAT_VERSION):
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise CheckpointError(
            f"{meta_path}: format_version {version!r}, this pqjax reads 1 and {FORMAT_VERSION}"
        )
    if leftovers(root):
        warnings.warn(f"{root}: an interrupted save left {_names(leftovers(root))}; the next "
                      "save there removes them", stacklevel=3)
    return meta


def _interrupted(root: Path) -> str:
    """What an interrupted save left in place of `root`, and how to recover it."""
    found = leftovers(root)
    if not found:
        return ""
    complete = [p for p in found if ".tmp-" in p.name and (p / checksums.CHECKSUMS).is_file()]
    old = [p for p in found if ".old-" in p.name]
    hint = f"; rename {complete[0]} to {root} to use the new one" if complete else ""
    return f"; an interrupted save left {_names(found)} beside it" + (
        hint or (f"; {old[0]} holds the previous checkpoint" if old else ""))


def _names(paths: list[Path]) -> str:
    return ", ".join(p.name for p in paths)


def _verify(root: Path, meta: dict[str, Any], abstract: nnx.Module) -> bool:
    """Check every file against checksums.json. Returns True when only the optional report is
    damaged (it is then dropped with a warning); raises CheckpointError for anything else."""
    if meta["format_version"] == 1:
        warnings.warn(f"{root}: format_version 1 has no checksums; restored unverified "
                      "(save it again to add them)", stacklevel=3)
        return False
    recorded = checksums.load(root)
    bad = checksums.damaged_files(root, recorded)
    fatal = [(f, why) for f, why in bad if not f.startswith(OPTIONAL)]
    if fatal:
        f, why = fatal[0]
        more = f" (and {len(fatal) - 1} more: {', '.join(g for g, _ in fatal[1:4])})" \
            if len(fatal) > 1 else ""
        arrays = ""
        if any(g.startswith("transformer/") for g, _ in fatal):
            arrays = "; " + _damaged_arrays(abstract, root / "transformer",
                                             recorded["arrays"].get("transformer", {}))
        raise CheckpointError(
            f"{root}: damaged checkpoint: {f}: {why}{more}{arrays} (checked against "
            f"{checksums.CHECKSUMS})"
        )
    if bad:
        warnings.warn(f"{root}: {bad[0][0]}: {bad[0][1]}; restoring without the report",
                      stacklevel=3)
    return bool(bad)


def _damaged_arrays(abstract: nnx.Module, where: Path, recorded: dict[str, str]) -> str:
    """Which arrays a damaged transformer file changed, read despite the damage if orbax can."""
    try:
        values = _read_state(nnx.clone(abstract), where)[2]
    except CheckpointError:
        return "the transformer arrays cannot be read to tell which changed"
    diff = checksums.differing_arrays(flat(jax.device_get(values)), recorded)
    if not diff:
        return "every transformer array still reads as saved"
    return f"arrays that differ: {', '.join(diff[:5])}" + (
        f" (and {len(diff) - 5} more)" if len(diff) > 5 else "")


def _load_report(path: Path) -> Any:
    """The report at `path`, or None (with a warning naming it) if it is missing or unreadable:
    it describes the quantization but is not needed to run the model."""
    from pqjax.report import QuantReport

    if not path.is_file():
        return None
    try:
        return QuantReport.load(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        warnings.warn(f"{path}: unreadable ({type(e).__name__}: {e}); restoring without the "
                      "report", stacklevel=3)
        return None


def components() -> dict[str, str]:
    """Pipeline parts a checkpoint can hold: class name -> "module:class", the union of the
    family records' `saved_parts` (`pqjax.models.family`)."""
    from pqjax.models.family import families

    table: dict[str, str] = {}
    for record in families():
        for name, where in record.saved_parts:
            if table.get(name, where) != where:
                raise TypeError(f"pipeline part {name} is named twice: {table[name]}, {where}")
            table[name] = where
    return table


def _pipeline_meta(pipe: Any) -> dict[str, Any]:
    if hasattr(pipe, "save_parts"):
        return {"kind": _component_name(pipe)}
    return {
        "text_encoder": _component_name(pipe.text_encoder),
        "decoder": _component_name(pipe.decoder),
        "defaults": dataclasses.asdict(pipe.defaults),
        "scheduler": dataclasses.asdict(pipe.scheduler),
    }


def _component_name(obj: Any) -> str:
    name = type(obj).__name__
    if name not in components():
        raise TypeError(
            f"cannot save a pipeline component of type {name}; known: {sorted(components())}"
        )
    return name


def _component(name: str) -> Any:
    import importlib

    if name not in components():
        raise CheckpointError(f"pipeline component {name!r} cannot be restored by this pqjax")
    module, cls = components()[name].split(":")
    return getattr(importlib.import_module(module), cls)
