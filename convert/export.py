"""Export an NNX model as a diffusers / transformers component folder, written as a whole.

export_model(model, "out/transformer")                 # config.json + safetensors
export_model(model, "out/transformer", max_shard_bytes=2**30)   # + index and shards

The folder is built in a temporary sibling `.<name>.export-tmp-<pid>-<id>` and swapped in only
when complete: the previous folder is moved aside, the new one renamed in, the old one deleted.
So a reader sees either the old export or the new one, never a mix (old index with new shards,
shards of two exports), and a failed or killed export leaves the target as it was. A target that
is not a model folder (files other than config.json and weights) is refused, not deleted.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from convert import bridge, registry
from convert.safetensors_io import CheckpointError, TensorSpec, write_safetensors

TMP_TAG, OLD_TAG = ".export-tmp-", ".export-old-"
# What a model folder holds; anything else in a target is a user's file and is never deleted.
MODEL_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json", "*.bin", "*.pt",
               "*.pth", "*.safetensors.tmp", "*.json.tmp")  # .tmp: left by older pqjax writers


def export_model(
    model: nnx.Module,
    out_dir: str | os.PathLike,
    *,
    dtype: Any | None = None,
    max_shard_bytes: int | None = None,
    fill: Callable[[str, tuple[int, ...], np.dtype], np.ndarray] | None = None,
) -> Path:
    """Write `config.json` and safetensors (sharded above `max_shard_bytes`) in torch layout.

    Replaces an earlier export (or any model folder: config.json plus weights) at `out_dir`
    atomically; refuses a folder that holds anything else. Returns `out_dir`. fill(key,
    torch shape, dtype) -> array: write these values instead of the model's, one tensor at a
    time, so an abstract model (`nnx.eval_shape`) exports as a full-size checkpoint of, say,
    random weights without ever holding them all.
    """
    spec = registry.spec_for_model(model)
    out = Path(out_dir)
    _check_target(out)
    specs, get = bridge.export_arrays(model, None if dtype is None else np.dtype(dtype))
    if fill is not None:
        shapes = {k: (s, d) for k, s, d in specs}

        def filled(key: str) -> np.ndarray:  # the model's own values are never read
            return fill(key, *shapes[key])

        get = filled
    tensors = [TensorSpec(k, s, d) for k, s, d in specs]
    shards = _shard(tensors, max_shard_bytes)
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(out)
    tmp = out.with_name(f".{out.name}{TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        name = spec.weights_name
        if len(shards) == 1:
            write_safetensors(tmp / f"{name}.safetensors", shards[0], get)
        else:
            weight_map, total = {}, 0
            for i, shard in enumerate(shards, 1):
                fname = f"{name}-{i:05d}-of-{len(shards):05d}.safetensors"
                total += write_safetensors(tmp / fname, shard, get)
                weight_map.update({t.key: fname for t in shard})
            _write_json(
                tmp / f"{name}.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": weight_map},
            )
        _write_json(tmp / "config.json", spec.dump(model.config))
        _fsync_dir(tmp)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


export_transformer = export_model


def _check_target(out: Path) -> None:
    """`out` may be absent, an empty folder, or a model folder; nothing else is overwritten."""
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise CheckpointError(f"{out}: exists and is not a folder; refusing to overwrite it")
    foreign = sorted(
        p.name for p in out.iterdir()
        if not (p.is_file() and any(p.match(pat) for pat in MODEL_FILES))
    )
    if foreign:
        raise CheckpointError(
            f"{out}: not a model folder (it holds {', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}); refusing to replace it. Export into a new "
            "folder or remove it first."
        )
    if any(out.iterdir()) and not (out / "config.json").is_file():
        raise CheckpointError(
            f"{out}: has weights but no config.json, so it is not an export; refusing to "
            "replace it"
        )


def _clean_stale(out: Path) -> None:
    """Remove temporary folders left by killed exports to `out` (their process is gone).

    A moved-aside old folder is removed only when `out` itself is complete again; if `out` is
    missing, the export was killed between the two renames and the old one is the user's data.
    """
    for p in out.parent.glob(f".{out.name}.export-*-*"):
        tag = TMP_TAG if TMP_TAG in p.name else OLD_TAG if OLD_TAG in p.name else None
        if tag is None or _alive(p.name.split(tag, 1)[1].split("-")[0]):
            continue
        if tag == OLD_TAG and not out.is_dir():
            raise CheckpointError(
                f"{out}: missing, and {p} holds the previous export moved aside by an export "
                "that was killed; rename it back to the target (or delete it) first"
            )
        shutil.rmtree(p, ignore_errors=True)


def _alive(pid: str) -> bool:
    if not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename complete folder `tmp` to `out`: old aside, new in, old deleted."""
    if not out.exists():
        os.rename(tmp, out)
        _fsync_dir(out.parent)
        return
    old = out.with_name(f".{out.name}{OLD_TAG}{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    _fsync_dir(out.parent)
    shutil.rmtree(old)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _shard(tensors: list[TensorSpec], max_bytes: int | None) -> list[list[TensorSpec]]:
    if not max_bytes:
        return [tensors]
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for t in tensors:
        nbytes = int(np.prod(t.shape, dtype=np.int64)) * np.dtype(t.dtype).itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    return shards


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
