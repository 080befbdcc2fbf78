"""Checksums of a saved folder: size and sha256 of every file, sha256 of every stored array.

    write(root, arrays={"transformer": {"proj_out.kernel": "9f2c..."}})   # root/checksums.json
    recorded = load(root)
    bad = damaged_files(root, recorded)      # [(relative path, what is wrong)], [] when intact

Files are hashed as bytes, so any flipped bit or truncation of any file is caught, and a file
that disappeared is named. Array digests cover the dtype, shape and bytes of each array as
restored, so that a damaged file can be traced to the arrays it changed. A file that is not
listed (added after the save) is ignored: it cannot change what the checkpoint restores.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from pqjax.errors import CheckpointError

CHECKSUMS = "checksums.json"
_CHUNK = 1 << 22


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def array_sha256(x: Any) -> str:
    """sha256 of an array's dtype name, shape and bytes (C order)."""
    a = np.asarray(x)
    h = hashlib.sha256(f"{a.dtype.name}{tuple(a.shape)}".encode())
    h.update(np.ascontiguousarray(a.reshape(-1)).view(np.uint8))
    return h.hexdigest()


def _sha256_all(paths: Iterable[Path]) -> list[str]:
    """sha256 of each file, on threads: hashlib releases the GIL, so this scales with cores."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(file_sha256, paths))


def file_digests(root: Path) -> dict[str, dict[str, Any]]:
    """{relative posix path: {"size", "sha256"}} of every file under `root`, but CHECKSUMS."""
    paths = sorted(p for p in root.rglob("*")
                   if p.is_file() and p.relative_to(root).as_posix() != CHECKSUMS)
    return {
        p.relative_to(root).as_posix(): {"size": p.stat().st_size, "sha256": h}
        for p, h in zip(paths, _sha256_all(paths), strict=True)
    }


def write(root: Path, arrays: Mapping[str, Mapping[str, str]]) -> None:
    """Record every file now under `root` (write this last), and the given array digests
    ({component folder: {dotted array key: sha256}})."""
    body = {"algorithm": "sha256", "files": file_digests(root), "arrays": dict(arrays)}
    (root / CHECKSUMS).write_text(json.dumps(body, indent=1) + "\n")


def load(root: Path) -> dict[str, Any]:
    """The recorded checksums of `root`; CheckpointError naming the file if unreadable."""
    path = root / CHECKSUMS
    try:
        body = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{path} is missing: the checkpoint cannot be verified") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupted ({e})") from e
    files = body.get("files") if isinstance(body, dict) else None
    ok = isinstance(files, dict) and all(
        isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
        for v in files.values()
    )
    if not ok or body.get("algorithm") != "sha256" or not isinstance(body.get("arrays"), dict):
        raise CheckpointError(f"{path}: corrupted (not a sha256 file list with array digests)")
    return body


def damaged_files(root: Path, recorded: dict[str, Any]) -> list[tuple[str, str]]:
    """[(relative path, "missing" | "size ..." | "content differs")] for every recorded file
    that is not as saved; sizes are compared first, so a truncated file is found unread."""
    bad, to_hash = [], []
    for rel, want in recorded["files"].items():
        path = root / rel
        if ".." in Path(rel).parts or not path.is_file():
            bad.append((rel, "missing"))
        elif path.stat().st_size != want["size"]:
            bad.append((rel, f"{path.stat().st_size} bytes, {want['size']} when saved"))
        else:
            to_hash.append(rel)
    digests = _sha256_all(root / rel for rel in to_hash)
    bad += [(rel, "content differs from its recorded sha256")
            for rel, h in zip(to_hash, digests, strict=True)
            if h != recorded["files"][rel]["sha256"]]
    order = {rel: i for i, rel in enumerate(recorded["files"])}
    return sorted(bad, key=lambda b: order[b[0]])


def differing_arrays(values: Mapping[str, Any], recorded: Mapping[str, str]) -> list[str]:
    """Keys of `values` (dotted key -> array) whose digest is not the recorded one."""
    return [k for k, v in values.items() if recorded.get(k) != array_sha256(v)]
