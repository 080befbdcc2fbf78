"""Where the engine's full-precision blocks come from: a model in memory, or a checkpoint on
disk read one block at a time.

    src = ModelSource(model)                     # blocks are clones of the model's
    src = CheckpointSource("flux-dev")           # blocks are read when asked for
    shell = src.shell()                          # everything but the blocks, loaded
    block = src.block("transformer_blocks.3")    # one full-precision block

Both give the same arrays for the same weights, so the engine's two paths quantize the same.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from flax import nnx

import convert
from convert.loader import ModelWeights
from pqjax.models.family import Family, family_of
from pqjax.models.paths import module_at


def shell_of(model: nnx.Module, block_lists: tuple[str, ...]) -> nnx.Module:
    """A copy of `model` whose block lists are empty (its embedders and final layers)."""
    held = {lst: getattr(model, lst) for lst in block_lists}
    try:
        for lst in block_lists:
            setattr(model, lst, nnx.List([]))
        return nnx.clone(model)
    finally:
        for lst, blocks in held.items():
            setattr(model, lst, blocks)


class ModelSource:
    """The blocks of a model held in memory (each handed out as a clone: the model stays as
    it is)."""

    def __init__(self, model: nnx.Module):
        self.model = model
        self.family: Family | None = family_of(model)

    @property
    def abstract(self) -> nnx.Module:
        return self.model

    def shell(self) -> nnx.Module:
        lists = () if self.family is None else self.family.block_lists
        return shell_of(self.model, lists)

    def block(self, name: str, digest: Any = None) -> nnx.Module:
        return nnx.clone(module_at(self.model, name))

    def fingerprint(self) -> dict[str, Any]:
        return {"kind": "memory"}


class CheckpointSource:
    """The transformer of a model folder (a name, a diffusers pipeline or transformer folder,
    an HF cache entry), read one block at a time in `dtype` (None: the checkpoint's own)."""

    def __init__(self, source: str | os.PathLike, *, dtype: Any = None,
                 allow_pickle: bool = False):
        self.folder = convert.resolve(source, "transformer")
        self.weights = ModelWeights(self.folder, dtype=dtype, allow_pickle=allow_pickle)
        self.abstract = self.weights.abstract()
        self.family = family_of(self.abstract)
        if self.family is None or self.family.runner is None:
            raise NotImplementedError(
                f"{self.folder}: {type(self.abstract).__name__} has no family record with a "
                "block runner (pqjax.models.family); it can only be quantized in memory")

    def shell(self, digest: Any = None) -> nnx.Module:
        lists = self.family.block_lists
        return self.weights.load(shell_of(self.abstract, lists), "", digest, exclude=lists)

    def block(self, name: str, digest: Any = None) -> nnx.Module:
        return self.weights.load(nnx.clone(module_at(self.abstract, name)), name, digest)

    def fingerprint(self) -> dict[str, Any]:
        """The weight files by name, size and modification time (what a resumed run checks
        before reusing finished blocks), and the dtype the blocks are held in."""
        files = self.weights.files()
        return {
            "kind": "checkpoint",
            "folder": str(self.folder),
            "dtype": self.weights.dtype.name,
            "files": {_name(p, self.folder): {"size": p.stat().st_size,
                                              "mtime_ns": p.stat().st_mtime_ns} for p in files},
        }


def _name(path: Path, folder: Path) -> str:
    try:
        return path.relative_to(folder).as_posix()
    except ValueError:
        return str(path)


def new_digest() -> Any:
    """The hash the engine fingerprints the weights it reads with."""
    return hashlib.sha256()
