"""Where the engine keeps finished stages: in memory, or in a work folder a run resumes from.

    store = MemoryStore()
    store = WorkDir("runs/flux-q", identity, resume=True)   # refuses another run's folder

A work folder holds, per finished block, its quantized state (`blocks/<name>.safetensors`),
what the report and the model stage need from it (`blocks/<name>.aux.safetensors`: the
accepted orders, each layer's calibrated absmax, the full statistics of the layers the model
stage reads), and the block inputs that follow it (`carries/<name>.safetensors`), each
recorded with its size
and sha256 in `manifest.json`, which is rewritten atomically after every block, so a killed
run loses at most the block it was on. The manifest also records what the run is: the weights
(file names, sizes, modification times, and a hash of every tensor each block read), the
calibration inputs (a hash of the batches), the config, the dtype and the row count. A
resumed run must be the same run: anything that changed is refused with what changed, and a
finished block's files are checked against their sha256 before they are used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from convert.safetensors_io import Checkpoint, TensorSpec, write_safetensors
from pqjax.calibrate import Calibration, LayerStats
from pqjax.checksums import file_sha256
from pqjax.errors import CheckpointError

MANIFEST = "manifest.json"
FORMAT = 1


class StreamInterrupted(RuntimeError):
    """Raised (tests) after `stop_after` blocks were finished in a run."""


@dataclasses.dataclass
class Aux:
    """A stage's arrays besides its module, paths absolute: accepted orders by site, each
    quantized layer's calibrated absmax (for the report), and the full statistics of the
    layers a later stage quantizes."""

    perms: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    absmax: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    stats: Calibration = dataclasses.field(default_factory=dict)


# ---- arrays of modules, carries and statistics as safetensors files -------------------------


def module_arrays(module: nnx.Module) -> dict[str, np.ndarray]:
    """Every state array of `module` by dotted path, on the host."""
    return {".".join(str(k) for k in path): np.asarray(jax.device_get(v.get_value()))
            for path, v in nnx.to_flat_state(nnx.state(module))}


def fill_module(abstract: nnx.Module, read: Any, where: str) -> nnx.Module:
    """`abstract` (its structure as saved) with every state array from `read(key)`; the
    shapes and dtypes must be the recorded ones."""
    graphdef, state = nnx.split(abstract)
    for path, var in nnx.to_flat_state(state):
        key = ".".join(str(k) for k in path)
        want = var.get_value()
        arr = read(key)
        if tuple(arr.shape) != tuple(want.shape) or np.dtype(arr.dtype) != np.dtype(want.dtype):
            raise CheckpointError(f"{where}: {key} is {arr.dtype} {arr.shape}, the recorded "
                                  f"layout expects {np.dtype(want.dtype)} {tuple(want.shape)}")
        var.set_value(jax.device_put(arr))
    return nnx.merge(graphdef, state)


def write_arrays(path: Path, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Write `arrays` to a safetensors file (atomically); returns its size and sha256."""
    specs = [TensorSpec(k, tuple(np.shape(a)), np.asarray(a).dtype) for k, a in arrays.items()]
    write_safetensors(path, specs, lambda k: np.asarray(arrays[k]), metadata={"format": "pqjax"})
    return {"size": path.stat().st_size, "sha256": file_sha256(path)}


def carry_arrays(carries: list[Any]) -> dict[str, np.ndarray]:
    """The leaves of each batch's carry, keyed "<batch>/<leaf path>"."""
    out = {}
    for i, carry in enumerate(carries):
        for path, leaf in jax.tree_util.tree_flatten_with_path(carry)[0]:
            out[f"{i}/{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
    return out


def carries_from(arrays: Checkpoint, like: list[Any]) -> list[Any]:
    """Carries with the structure of `like` (abstract is enough) and the leaves in `arrays`."""
    out = []
    for i, carry in enumerate(like):
        leaves, treedef = jax.tree_util.tree_flatten_with_path(carry)
        out.append(jax.tree_util.tree_unflatten(
            treedef, [arrays.read(f"{i}/{jax.tree_util.keystr(p)}") for p, _ in leaves]))
    return out


def aux_arrays(aux: Aux) -> dict[str, np.ndarray]:
    out = {f"perm/{k}": np.asarray(v, np.int32) for k, v in aux.perms.items()}
    out.update({f"absmax/{k}": np.asarray(v, np.float32) for k, v in aux.absmax.items()})
    for path, st in aux.stats.items():
        out[f"stats/{path}/mean_sq"] = np.asarray(st.mean_sq)
        out[f"stats/{path}/absmax"] = np.asarray(st.absmax)
        out[f"stats/{path}/rows"] = np.asarray(st.rows)
        out[f"stats/{path}/count"] = np.asarray(st.count, np.int64)
        if st.batch_absmax is not None:
            out[f"stats/{path}/batch_absmax"] = np.asarray(st.batch_absmax)
    return out


def aux_from(arrays: Checkpoint) -> Aux:
    keys = arrays.keys()

    def under(kind: str) -> list[str]:
        return [k[len(kind) + 1:] for k in keys if k.startswith(kind + "/")]

    stats = sorted({k.rsplit("/", 1)[0] for k in under("stats")})
    return Aux(
        perms={k: arrays.read(f"perm/{k}") for k in under("perm")},
        absmax={k: arrays.read(f"absmax/{k}") for k in under("absmax")},
        stats={p: LayerStats(mean_sq=arrays.read(f"stats/{p}/mean_sq"),
                             absmax=arrays.read(f"stats/{p}/absmax"),
                             count=int(arrays.read(f"stats/{p}/count")),
                             rows=arrays.read(f"stats/{p}/rows"),
                             batch_absmax=arrays.read(f"stats/{p}/batch_absmax")
                             if f"stats/{p}/batch_absmax" in keys else None) for p in stats},
    )


def batches_sha256(batches: list[dict[str, Any]]) -> str:
    """A hash of the calibration inputs: every key, dtype, shape and byte, batch by batch."""
    h = hashlib.sha256()
    for i, batch in enumerate(batches):
        for key in sorted(batch):
            for path, leaf in jax.tree_util.tree_flatten_with_path(batch[key])[0]:
                a = np.ascontiguousarray(np.asarray(leaf))
                h.update(f"{i}/{key}{jax.tree_util.keystr(path)}:{a.dtype.str}:{a.shape};".encode())
                h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()


# ---- the stores ------------------------------------------------------------------------------


class MemoryStore:
    """Finished stages held in memory (the in-memory path; nothing to resume)."""

    def __init__(self):
        self.modules: dict[str, nnx.Module] = {}
        self.aux_of: dict[str, Aux] = {}

    def entry(self, name: str) -> dict[str, Any] | None:
        return None

    def put(self, name: str, module: nnx.Module, entry: dict[str, Any], aux: Aux,
            carries: list[Any] | None = None) -> None:
        self.modules[name], self.aux_of[name] = module, aux

    def module(self, name: str, abstract: Any) -> nnx.Module:
        return self.modules[name]

    def aux(self, name: str) -> Aux:
        return self.aux_of[name]


class WorkDir:
    """A resumable work folder; see the module docstring."""

    def __init__(self, path: str | os.PathLike, identity: dict[str, Any], *, resume: bool):
        self.root = Path(path).expanduser().resolve()
        self.manifest_path = self.root / MANIFEST
        self.identity = json.loads(json.dumps(identity, default=float))
        self.manifest = {"format": FORMAT, "identity": self.identity, "stages": {}}
        self._checked: dict[Path, tuple[str, int, int]] = {}  # files whose sha256 matched
        if self.manifest_path.exists():
            old = self._read_manifest()
            if not resume:
                raise FileExistsError(f"{self.root} holds a run ({MANIFEST}); pass resume=True "
                                      "to continue it, or use a new folder")
            changed = _differences(old.get("identity", {}), self.identity)
            if changed:
                raise CheckpointError(
                    f"{self.manifest_path}: written by another run; it differs in "
                    f"{'; '.join(changed[:4])}. Use a new work folder for new work")
            self.manifest = old
        elif self.root.is_dir() and any(self.root.iterdir()):
            raise CheckpointError(
                f"{self.root}: not empty and holds no {MANIFEST}, so which run wrote its files "
                "cannot be told; use a new (or empty) work folder")
        for sub in ("blocks", "carries"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._write_manifest()  # at once: a run killed in its first block resumes too

    def _write_manifest(self) -> None:
        tmp = self.manifest_path.with_name(MANIFEST + ".tmp")
        tmp.write_text(json.dumps(self.manifest, indent=1, default=float))
        os.replace(tmp, self.manifest_path)

    def _read_manifest(self) -> dict[str, Any]:
        try:
            body = json.loads(self.manifest_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.manifest_path}: corrupted ({e}); use a new work "
                                  "folder") from e
        if not isinstance(body, dict) or body.get("format") != FORMAT \
                or not isinstance(body.get("stages"), dict):
            raise CheckpointError(f"{self.manifest_path}: not a pqjax engine manifest (format "
                                  f"{FORMAT})")
        return body

    def _file(self, name: str, kind: str) -> Path:
        folder = "carries" if kind == "carries" else "blocks"
        suffix = "" if kind in ("block", "carries") else f".{kind}"
        return self.root / folder / f"{name}{suffix}.safetensors"

    def _verified(self, name: str, kind: str) -> Checkpoint:
        """The file, opened, once its size and sha256 are the recorded ones (hashed once per
        process while its size and modification time stay as they were)."""
        path = self._file(name, kind)
        want = self.manifest["stages"][name]["files"][kind]
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (recorded for finished stage {name})")
        stat = path.stat()
        seen = (want["sha256"], stat.st_size, stat.st_mtime_ns)
        if self._checked.get(path) != seen:
            if stat.st_size != want["size"] or file_sha256(path) != want["sha256"]:
                raise CheckpointError(
                    f"{path}: damaged: its content differs from its recorded sha256 (stage "
                    f"{name}); delete the work folder to start over")
            self._checked[path] = seen
        return Checkpoint.open(path)

    def entry(self, name: str) -> dict[str, Any] | None:
        """The manifest entry of stage `name` if it finished, its files verified."""
        entry = self.manifest["stages"].get(name)
        if entry is not None:
            for kind in entry["files"]:
                self._verified(name, kind)
        return entry

    def put(self, name: str, module: nnx.Module, entry: dict[str, Any], aux: Aux,
            carries: list[Any] | None = None) -> None:
        """Record finished stage `name`: its module, its arrays besides, the carries after it."""
        files = {"block": write_arrays(self._file(name, "block"), module_arrays(module)),
                 "aux": write_arrays(self._file(name, "aux"), aux_arrays(aux))}
        if carries is not None:
            files["carries"] = write_arrays(self._file(name, "carries"), carry_arrays(carries))
        for kind, rec in files.items():  # hashed as written: no need to hash them again
            stat = self._file(name, kind).stat()
            self._checked[self._file(name, kind)] = (rec["sha256"], stat.st_size,
                                                     stat.st_mtime_ns)
        previous = [s for s, e in self.manifest["stages"].items() if "carries" in e["files"]]
        for old in previous:  # only the newest carries are needed to resume
            del self.manifest["stages"][old]["files"]["carries"]
        self.manifest["stages"][name] = {**entry, "files": files}
        self._write_manifest()
        for old in previous:  # unlisted now; a kill before this leaves them unused
            self._file(old, "carries").unlink(missing_ok=True)

    def module(self, name: str, abstract: Any) -> nnx.Module:
        """Stage `name`'s module; `abstract()` gives its structure."""
        arrays = self._verified(name, "block")
        return fill_module(abstract(), arrays.read, str(self._file(name, "block")))

    def aux(self, name: str) -> Aux:
        return aux_from(self._verified(name, "aux"))

    def carries(self, name: str, like: list[Any]) -> list[Any] | None:
        """The carries saved after stage `name`, or None if not kept."""
        if "carries" not in self.manifest["stages"][name]["files"]:
            return None
        return carries_from(self._verified(name, "carries"), like)

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _differences(old: Any, new: Any, where: str = "") -> list[str]:
    """What differs between two JSON values, as 'key: old -> new' lines."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(k), new.get(k), f"{where}.{k}" if where else str(k))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new))
                for d in _differences(a, b, f"{where}[{i}]")]
    if old != new:
        def short(v: Any) -> str:
            text = json.dumps(v, default=str)
            return text if len(text) <= 60 else text[:57] + "..."
        return [f"{where}: {short(old)} -> {short(new)}"]
    return []
