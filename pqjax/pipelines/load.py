"""Load a full-precision pipeline by name or path: the embedded tiny model, or a diffusers folder.

    pipe = load_pipeline()                    # the embedded trained tiny FLUX (default)
    pipe = load_pipeline("flux-dev")          # a FLUX.1 folder on disk (HF cache, path, name)

The pipeline root's `model_index.json` says which kind it is.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax.numpy as jnp

import convert
from convert.resolve import EMBEDDED_MODELS
from pqjax.pipelines.flow import FlowMatchEuler
from pqjax.pipelines.pipeline import IdentityDecoder, Pipeline, SamplingDefaults

EMBEDDED = EMBEDDED_MODELS[0]  # "tiny-flux-digits", in pqjax/assets/


def resolve_root(name_or_path: str | os.PathLike) -> Path:
    """The pipeline root folder (with model_index.json) of a name or path (the embedded
    model's name included: `convert.resolve` knows it)."""
    component = convert.resolve(name_or_path, "transformer")
    root = component.parent if component.name == "transformer" else component
    if not (root / "model_index.json").is_file():
        raise convert.ModelNotFoundError(
            f"{name_or_path}: {root} has no model_index.json; pass a diffusers pipeline folder "
            "(a transformer folder alone has no text encoder or scheduler)"
        )
    return root


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: missing") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def load_tiny(root: Path, dtype: Any = jnp.float32, *, allow_pickle: bool = False) -> Pipeline:
    """The embedded pixel-space digits model: prompt table, identity decoder."""
    from pqjax.models.text_table import PromptTable

    transformer = convert.load_transformer(root, dtype=dtype, allow_pickle=allow_pickle)
    scheduler = FlowMatchEuler.from_config(
        _read_json(root / "scheduler" / "scheduler_config.json"),
        str(root / "scheduler" / "scheduler_config.json"),
    )
    defaults = SamplingDefaults.from_dict(_read_json(root / "pipeline.json"))
    return Pipeline(
        transformer,
        PromptTable.load(root / "text_encoder"),
        scheduler,
        IdentityDecoder(),
        defaults,
        source=str(root),
    )


# class name -> loader(root, dtype, *, allow_pickle) -> Pipeline
_LOADERS: dict[str, Callable[..., Pipeline]] = {"TinyFluxDigitsPipeline": load_tiny}
# Pipelines whose modules import nothing from this one: (module, loader), imported on use.
_FAMILY_LOADERS: dict[str, tuple[str, str]] = {
    "SanaPipeline": ("pqjax.pipelines.sana_pipeline", "load_sana"),
    "ZImagePipeline": ("pqjax.pipelines.zimage_pipeline", "load_zimage"),
}


def register_pipeline(class_name: str) -> Callable[[Callable], Callable]:
    def add(fn: Callable[..., Pipeline]) -> Callable[..., Pipeline]:
        _LOADERS[class_name] = fn
        return fn

    return add


def load_pipeline(
    name_or_path: str | os.PathLike = EMBEDDED,
    dtype: Any = jnp.float32,
    *,
    allow_pickle: bool = False,
) -> Pipeline:
    """The full-precision pipeline at `name_or_path` (see module docstring).

    allow_pickle: also load pickled `.bin`/`.pt` weights (torch, `weights_only=True`); off by
    default because a pickle can run code."""
    root = resolve_root(name_or_path)
    index = _read_json(root / "model_index.json")
    kind = index.get("_class_name")
    if kind == "FluxPipeline" and kind not in _LOADERS:
        import pqjax.pipelines.flux  # noqa: F401  (registers the FLUX.1 loader)
    if kind in _FAMILY_LOADERS:
        module, name = _FAMILY_LOADERS[kind]
        pipe = getattr(importlib.import_module(module), name)(root, dtype,
                                                              allow_pickle=allow_pickle)
        pipe.source = str(name_or_path)
        return pipe
    if kind not in _LOADERS:
        raise ValueError(
            f"{root / 'model_index.json'}: pipeline class {kind!r} is not supported; "
            f"supported: {sorted([*_LOADERS, 'FluxPipeline', *_FAMILY_LOADERS])}"
        )
    pipe = _LOADERS[kind](root, dtype, allow_pickle=allow_pickle)
    pipe.source = str(name_or_path)
    return pipe
