"""Small readers shared by the pipeline loaders (a leaf of `pqjax.pipelines`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pqjax.errors import CheckpointError


def read_json(path: Path) -> dict[str, Any]:
    """A pipeline folder's JSON file; missing (FileNotFoundError) or unparsable (ValueError)
    names the file."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: missing") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; a missing, unparsable or non-object file names itself."""
    try:
        value = json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: missing") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: must hold a JSON object, got {type(value).__name__}")
    return value


def save_lm_parts(folder: Path, text_encoder: Any, tokenizer: Any, vae: Any,
                  settings: dict[str, Any]) -> None:
    """A decoder-LM pipeline's parts besides the transformer: `text_encoder/`, `tokenizer/`,
    `vae/` and `settings.json` (schedule and sampling defaults)."""
    import convert
    from pqjax.models.lm_tokenizer import save_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    convert.export_model(text_encoder, folder / "text_encoder")
    save_tokenizer(tokenizer, folder / "tokenizer")
    convert.export_model(vae, folder / "vae")
    (folder / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")


def load_lm_parts(folder: Path) -> tuple[Any, Any, Any, dict[str, Any]]:
    """(text_encoder, tokenizer, vae, settings) written by `save_lm_parts`."""
    import convert
    from pqjax.models.lm_tokenizer import LMTokenizer

    folder = Path(folder)
    return (convert.load_model(folder / "text_encoder"), LMTokenizer.load(folder / "tokenizer"),
            convert.load_model(folder / "vae"), read_json_object(folder / "settings.json"))
