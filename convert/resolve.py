"""Resolve a model name or path to a local folder. Never touches the network.

Accepted:
- the name of a model embedded in pqjax (`tiny-flux-digits`, under `pqjax/assets/`),
- a diffusers pipeline root (has `model_index.json`; the component is a subfolder),
- a component folder itself (has `config.json` and weights),
- a Hugging Face repo id or short name (`flux-dev`), looked up in the local HF cache
  (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`) under
  `models--org--name/snapshots/<rev>/`, the revision `refs/main` points at first.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from pqjax.errors import MissingFileError

SHORT_NAMES: dict[str, str] = {
    "flux-dev": "black-forest-labs/FLUX.1-dev",
    "flux-schnell": "black-forest-labs/FLUX.1-schnell",
    "sana-1.5-1.6b": "Efficient-Large-Model/SANA1.5_1.6B_1024px_diffusers",
    "z-image-turbo": "Tongyi-MAI/Z-Image-Turbo",
}

# Models shipped inside the pqjax package (pqjax/assets/<name>): a pipeline folder each.
EMBEDDED_MODELS: tuple[str, ...] = ("tiny-flux-digits",)

WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.pt", "*.pth")


class ModelNotFoundError(MissingFileError):
    """A named model that is not on this machine; the message says where we looked."""


def embedded_root(name: str) -> Path | None:
    """The pipeline folder of an embedded model `name`, or None if `name` is not one.

    Found through the import system's spec of `pqjax`, without importing it (convert sits
    below pqjax's pipelines, which import convert).
    """
    if name not in EMBEDDED_MODELS:
        return None
    spec = importlib.util.find_spec("pqjax")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for base in locations:
        root = Path(base) / "assets" / name
        if (root / "model_index.json").is_file():
            return root
    raise ModelNotFoundError(
        f"the embedded model {name!r} is missing from the pqjax package "
        f"(looked in {[str(Path(b) / 'assets') for b in locations]}); reinstall pqjax"
    )


def hub_cache_dirs() -> list[Path]:
    """The HF hub cache folders to search, in priority order."""
    dirs: list[Path] = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]) / "hub")
    xdg = os.environ.get("XDG_CACHE_HOME")
    dirs.append((Path(xdg) if xdg else Path.home() / ".cache") / "huggingface" / "hub")
    seen, out = set(), []
    for d in dirs:
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def _snapshot(cache: Path, repo_id: str) -> Path | None:
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo / "refs" / "main"
    if ref.is_file():
        rev = ref.read_text().strip()
        candidate = snapshots / rev
        if not rev or "/" in rev or not candidate.is_dir():
            raise ModelNotFoundError(
                f"{ref} names revision {rev!r}, but {snapshots} has no such snapshot (a partial "
                "or interrupted download?); download it again, or pass the snapshot folder"
            )
        return candidate
    revs = sorted(
        (p for p in snapshots.iterdir() if p.is_dir()),  # a stray file is no snapshot
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    return revs[0] if revs else None


def has_weights(folder: Path) -> bool:
    return any(any(folder.glob(p)) for p in WEIGHT_PATTERNS)


def _component(root: Path, subfolder: str | None, what: str) -> Path:
    """`root` is a pipeline root or a component folder; return the component folder."""
    if subfolder and (root / "model_index.json").is_file():
        folder = root / subfolder
        if not (folder / "config.json").is_file():
            raise ModelNotFoundError(
                f"{root} is a diffusers pipeline folder but has no {subfolder}/config.json"
            )
        return folder
    if (root / "config.json").is_file():
        return root
    if subfolder and (root / subfolder / "config.json").is_file():
        return root / subfolder
    raise ModelNotFoundError(
        f"{root} is neither a diffusers pipeline folder (model_index.json) nor a {what} folder "
        f"(config.json + weights)"
    )


def resolve(path_or_name: str | os.PathLike, subfolder: str | None = "transformer") -> Path:
    """Local folder of the component `subfolder` of `path_or_name` (see module docstring)."""
    if not str(path_or_name).strip():
        raise ModelNotFoundError(
            f"model name or path is empty ({str(path_or_name)!r}); pass a folder, a Hugging Face "
            f"repo id or a short name ({sorted(SHORT_NAMES)}); '.' for the current folder"
        )
    what = subfolder or "model"
    embedded = embedded_root(str(path_or_name))
    if embedded is not None:
        return _component(embedded, subfolder, what)
    path = Path(path_or_name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"{path} is a file; pass the model folder that holds it")
        return _component(path, subfolder, what)
    name = str(path_or_name)
    repo_id = SHORT_NAMES.get(name, name)
    looked: list[str] = [f"{path.resolve()} (as a path)"]
    if repo_id.count("/") == 1:
        for cache in hub_cache_dirs():
            snap = _snapshot(cache, repo_id)
            looked.append(str(cache / ("models--" + repo_id.replace("/", "--")) / "snapshots"))
            if snap is not None:
                return _component(snap, subfolder, what)
    hint = (
        f"Download it first, e.g. `hf download {repo_id}` (or `huggingface-cli download "
        f"{repo_id}`), or pass the local folder. Short names: {sorted(SHORT_NAMES)}; "
        f"embedded: {list(EMBEDDED_MODELS)}."
        if repo_id.count("/") == 1
        else f"Known short names: {sorted(SHORT_NAMES)}; embedded: {list(EMBEDDED_MODELS)}; "
        "or pass a local folder or an org/name id."
    )
    raise ModelNotFoundError(
        f"model {name!r} is not on this machine (pqjax never downloads). Looked in:\n  "
        + "\n  ".join(looked)
        + f"\n{hint}"
    )
