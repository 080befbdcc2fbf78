"""jax's persistent compilation cache for pqjax commands: compiled programs kept on disk.

    folder = enable()        # $PQJAX_COMPILE_CACHE, else $XDG_CACHE_HOME/pqjax/jax,
                             # else ~/.cache/pqjax/jax; None when turned off

PQJAX_COMPILE_CACHE=0 (or off/false/no) turns it off; any other value names the folder. A
cache folder that jax is already configured with (JAX_COMPILATION_CACHE_DIR, a test run's) is
kept as it is.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

ENV = "PQJAX_COMPILE_CACHE"
OFF = ("0", "off", "false", "no")


def user_dir() -> Path:
    """pqjax's folder in the user's cache: $XDG_CACHE_HOME/pqjax, else ~/.cache/pqjax."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "pqjax"


def default_dir() -> Path | None:
    """The cache folder to use, or None when PQJAX_COMPILE_CACHE turns the cache off."""
    value = os.environ.get(ENV, "").strip()
    if value.lower() in OFF:
        return None
    if value and value.lower() not in ("1", "on", "true", "yes"):
        return Path(value).expanduser()
    return user_dir() / "jax"


def enable(folder: Path | None = None) -> Path | None:
    """Point jax's persistent compilation cache at `folder` (default: `default_dir()`).

    Returns the folder in use, or None (turned off, or the folder cannot be created: a
    warning says so and compilation proceeds uncached).
    """
    import jax

    current = jax.config.jax_compilation_cache_dir
    if current:
        return Path(current)
    folder = folder or default_dir()
    if folder is None:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        warnings.warn(f"pqjax: compilation cache off, cannot create {folder} ({e})", stacklevel=2)
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    # the sampling loop and calibration programs take seconds; tiny programs are not worth a file
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder
