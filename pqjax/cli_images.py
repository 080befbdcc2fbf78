"""Where `pqjax generate` writes its images, and the writing (atomic, one file at a time).

    paths = image_paths("digits/", n=2, grid=False)    # [digits/0.png, digits/1.png]
    save_images(images, paths, scale=1, grid=False)     # images (b, H, W[, 3]) in [0, 1]

--out is a folder (one PNG per prompt, named by index), a pattern holding {i}, one file for a
single prompt, or with grid the one file that holds every image side by side.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class UsageError(Exception):
    """A bad command line: printed without a traceback, exit code 2."""


def image_extensions() -> dict[str, str]:
    """File extension -> PIL format, for the formats PIL can write."""
    from PIL import Image

    Image.init()
    return {ext: fmt for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}


def image_paths(out: str, n: int, grid: bool) -> list[Path]:
    """Where `generate` writes n images (one path with grid). See the --out help."""
    exts = image_extensions()
    path = Path(out)
    is_folder = out.endswith(("/", os.sep)) or path.is_dir() or not path.suffix
    if "{i}" in out or not is_folder:
        if path.suffix.lower() not in exts:
            raise UsageError(
                f"--out {out}: {path.suffix or 'no extension'} is not an image format PIL "
                "writes (use .png); a folder: end it with /"
            )
    if grid:
        if is_folder or "{i}" in out:
            raise UsageError(
                f"--out {out}: with --grid, give one image file (with its extension), e.g. grid.png"
            )
        paths = [path]
    elif "{i}" in out:
        try:
            paths = [Path(out.format(i=i)) for i in range(n)]
        except (KeyError, IndexError, ValueError) as e:
            raise UsageError(f"--out {out}: a pattern may only hold {{i}} ({e!r})") from e
    elif is_folder:
        width = len(str(n - 1))
        paths = [path / f"{i:0{width}d}.png" for i in range(n)]
        _writable_parent(path, "--out")
        return paths
    elif n == 1:
        paths = [path]
    else:
        raise UsageError(
            f"--out {out} names one file for {n} prompts: give a folder, a pattern with {{i}} "
            f"(e.g. {path.stem}_{{i}}{path.suffix}), or --grid"
        )
    for p in paths:
        _writable_parent(p, "--out", create=False)
    return paths


def _writable_parent(path: Path, flag: str, create: bool = True) -> None:
    """The folder `path` is written into must exist (`path` itself may be created if create)."""
    parent = path.resolve().parent
    if path.is_dir() and create:
        parent = path.resolve()
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{flag} {path}: the folder {parent} is not writable")


def _to_uint8(images: np.ndarray, scale: int) -> list[np.ndarray]:
    arr = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    return [np.kron(a, np.ones((scale, scale) + (1,) * (a.ndim - 2), np.uint8)) for a in arr]


def _write_image(tile: np.ndarray, path: Path) -> None:
    """Atomic: a temporary file in the same folder, then a rename."""
    from PIL import Image

    path.parent.mkdir(exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        Image.fromarray(tile).save(tmp, format=image_extensions()[path.suffix.lower()])
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_images(images: np.ndarray, paths: list[Path], scale: int, grid: bool) -> None:
    """`images` (b, H, W) or (b, H, W, 3) in [0, 1]: one file each, or with grid one file of
    all of them side by side; each upscaled `scale` times (nearest neighbour)."""
    tiles = _to_uint8(images, scale)
    if grid:
        _write_image(np.concatenate(tiles, axis=1), paths[0])
        return
    for tile, path in zip(tiles, paths, strict=True):
        _write_image(tile, path)
