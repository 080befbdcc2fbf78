"""A finished `stream_quantize` run's model, read back from its work folder.

    qmodel = load_result("runs/flux-q")        # the quantized transformer, assembled
    model = StoredModel("runs/flux-q")         # the same, loaded only while it is used

`StoredModel` is how a pipeline holds its quantized transformer under a memory budget: the
samplers ask for it (`for_sampling`) after the prompts are encoded and the text encoders
released, so the transformer and the encoders are never in memory together, and run it one
jitted block at a time, so that a program holds one block's temporaries: in one jit of the
whole sampling loop, XLA's CPU backend schedules every layer's dequantization up front, and
holds every dequantized weight at once (XLA's memory analysis of the compiled forward: 1.36 GB
of temporaries per full-width FLUX double + single block pair; with
XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false, 0.09 GB).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jax.numpy as jnp
from flax import nnx

from convert import registry
from pqjax.engine.run import MODEL_STAGE, assemble_model, view_maker
from pqjax.engine.stages import Stages
from pqjax.engine.store import MANIFEST, WorkDir
from pqjax.errors import CheckpointError
from pqjax.quantize import QuantConfig


def _identity(root: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((root / MANIFEST).read_text())
        return manifest["identity"]
    except FileNotFoundError as e:
        raise CheckpointError(f"{root / MANIFEST}: missing; not a pqjax work folder") from e
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{root / MANIFEST}: corrupted ({e})") from e


def _abstract(identity: dict[str, Any], where: str) -> nnx.Module:
    meta = identity["transformer"]
    spec = registry.spec_for_class_name(meta["class_name"], where)
    config = spec.parse(meta["config"], where)
    dtype = jnp.dtype(identity["source"]["dtype"])
    return nnx.eval_shape(lambda: spec.module(config, dtype=dtype, rngs=nnx.Rngs(0)))


def load_result(work_dir: str | os.PathLike) -> nnx.Module:
    """The quantized model a finished run left in `work_dir` (every file verified)."""
    root = Path(work_dir).expanduser().resolve()
    identity = _identity(root)
    store = WorkDir(root, identity, resume=True)
    entry = store.entry(MODEL_STAGE)
    if entry is None:
        raise CheckpointError(f"{root}: the run has not finished (no model stage in "
                              f"{MANIFEST}); rerun the same call to resume it")
    source = SimpleNamespace(abstract=_abstract(identity, str(root / MANIFEST)))
    stages = Stages.of(source.abstract, QuantConfig.from_dict(identity["config"]))
    qview = store.module(MODEL_STAGE, lambda: view_maker(source, stages, store)(entry["layout"]))
    return assemble_model(qview, stages, store, source)


class StoredModel:
    """A quantized transformer left in its work folder: `load()` reads it (`held` does it for
    the samplers), `config` is its config without reading anything."""

    on_demand = True

    def __init__(self, work_dir: str | os.PathLike):
        self.work_dir = Path(work_dir).expanduser().resolve()
        identity = _identity(self.work_dir)
        self.config = _abstract(identity, str(self.work_dir / MANIFEST)).config

    def load(self) -> nnx.Module:
        return load_result(self.work_dir)

    def sampling_model(self) -> Any:
        """The model, loaded, run one jitted block at a time (see the module docstring)."""
        from pqjax.engine.sources import ModelSource
        from pqjax.engine.streamed import StreamedModel

        return StreamedModel(ModelSource(self.load()))
