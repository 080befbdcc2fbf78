"""Replace a folder atomically, and find what earlier killed writes left beside it.

    tmp = temp_sibling(out)          # out/../.out.tmp-<host>-<pid>-<hex>: write everything here
    replace_dir(tmp, out)            # old folder aside, new one in, then the old one deleted

A kill at any point leaves `out` as either the complete old or the complete new folder, except
between the two renames, when `out` is absent and both are siblings of it. Sibling names carry
the writer's host and process id, so a later writer can tell a leftover of a process that is
gone (removed by `clean_leftovers`) from one that another live process is still writing.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import uuid
import warnings
from pathlib import Path

_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:32]


def temp_sibling(out: Path, kind: str = "tmp") -> Path:
    """A fresh hidden sibling of `out` for a write in progress (kind "tmp") or an old folder
    on its way out (kind "old")."""
    return out.with_name(f".{out.name}.{kind}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def leftovers(out: Path) -> list[Path]:
    """Siblings of `out` made by `temp_sibling` (or the legacy `.name.tmp-<hex8>`), sorted."""
    pattern = re.compile(
        rf"\.{re.escape(out.name)}\.(tmp|old)-(.+-\d+-[0-9a-f]{{8}}|[0-9a-f]{{8}})"
    )
    if not out.parent.is_dir():
        return []
    return sorted(p for p in out.parent.iterdir() if pattern.fullmatch(p.name))


def _writer_is_gone(p: Path) -> bool:
    m = re.search(r"-(.+)-(\d+)-[0-9a-f]{8}$", p.name)
    if m is None:
        return True  # legacy name without a process id: written by an older pqjax
    host, pid = m.group(1), int(m.group(2))
    if host != _HOST or pid == os.getpid():
        return False  # another machine's, or this process's own: cannot tell, keep it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def clean_leftovers(out: Path) -> list[Path]:
    """Remove the leftovers of `out` whose writer is gone; warn about (and return) the rest."""
    kept = []
    for p in leftovers(out):
        if _writer_is_gone(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            kept.append(p)
    if kept:
        warnings.warn(
            f"{out}: left alone, possibly being written by another process: "
            + ", ".join(p.name for p in kept),
            stacklevel=3,
        )
    return kept


def replace_dir(new: Path, out: Path) -> None:
    """Put the complete folder `new` at `out` (a sibling), replacing what is there.

    The old folder is renamed aside first and deleted only once `new` is in place; if the
    second rename fails, the old folder is put back.
    """
    if not out.exists():
        os.replace(new, out)
        return
    old = temp_sibling(out, "old")
    os.replace(out, old)
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)  # a kill here leaves `old`: the next writer removes it
