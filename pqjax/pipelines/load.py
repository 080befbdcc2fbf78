"""Load a full-precision pipeline by name or path: the embedded tiny model, or a diffusers folder.

    pipe = load_pipeline()                    # the embedded trained tiny FLUX (default)
    pipe = load_pipeline("flux-dev")          # a FLUX.1 folder on disk (HF cache, path, name)

The pipeline root's `model_index.json` says which kind it is.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import convert
from convert.resolve import EMBEDDED_MODELS
from pqjax.models.family import families, family_of_pipeline
from pqjax.pipelines.components import parse_bytes, read_json
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


def load_tiny(root: Path, dtype: Any = None, *, allow_pickle: bool = False,
              max_memory: Any = None, transformer: Any = None) -> Pipeline:
    """The embedded pixel-space digits model: prompt table, identity decoder (max_memory: no
    encoder to release, the prompt table is a few kilobytes). transformer: use this one
    instead of loading it."""
    from pqjax.models.text_table import PromptTable

    if transformer is None:
        transformer = convert.load_transformer(root, dtype=dtype, allow_pickle=allow_pickle)
    scheduler = FlowMatchEuler.from_config(
        read_json(root / "scheduler" / "scheduler_config.json"),
        str(root / "scheduler" / "scheduler_config.json"),
    )
    defaults = SamplingDefaults.from_dict(read_json(root / "pipeline.json"))
    return Pipeline(
        transformer,
        PromptTable.load(root / "text_encoder"),
        scheduler,
        IdentityDecoder(),
        defaults,
        source=str(root),
    )


# class name -> loader(root, dtype, *, allow_pickle) -> Pipeline, for pipelines outside the
# family records (`pqjax.models.family`: FLUX.1 and the embedded model, SANA, Z-Image).
_LOADERS: dict[str, Callable[..., Pipeline]] = {}


def register_pipeline(class_name: str) -> Callable[[Callable], Callable]:
    def add(fn: Callable[..., Pipeline]) -> Callable[..., Pipeline]:
        _LOADERS[class_name] = fn
        return fn

    return add


def load_pipeline(
    name_or_path: str | os.PathLike = EMBEDDED,
    dtype: Any = None,
    *,
    allow_pickle: bool = False,
    max_memory: int | str | None = None,
    transformer: Any = None,
) -> Pipeline:
    """The full-precision pipeline at `name_or_path` (see module docstring), each component
    held in `dtype` (None: its checkpoint's own, bf16 for FLUX.1-dev).

    allow_pickle: also load pickled `.bin`/`.pt` weights (torch, `weights_only=True`); off by
    default because a pickle can run code. max_memory (bytes, or e.g. "16GiB"): where the
    weights of all components exceed it, the text encoders stay on disk and load for each
    encoding only (`pqjax.pipelines.components.OnDemand`): encode, release, then sample.
    transformer: use this model instead of loading the folder's (`pqjax.engine.streamed`)."""
    parse_bytes(max_memory)  # refused before anything is read
    root = resolve_root(name_or_path)
    index = read_json(root / "model_index.json")
    kind = index.get("_class_name")
    fam = family_of_pipeline(kind) if isinstance(kind, str) else None
    if not isinstance(kind, str) or (kind not in _LOADERS and fam is None):
        known = [c for f in families() for c, _ in f.pipelines]
        raise ValueError(
            f"{root / 'model_index.json'}: pipeline class {kind!r} is not supported; "
            f"supported: {sorted([*_LOADERS, *known])}"
        )
    loader = _LOADERS[kind] if kind in _LOADERS else fam.pipeline_loader(kind)
    kw = {} if max_memory is None else {"max_memory": max_memory}
    if transformer is not None:
        kw["transformer"] = transformer
    pipe = loader(root, dtype, allow_pickle=allow_pickle, **kw)
    pipe.source = str(name_or_path)
    return pipe
