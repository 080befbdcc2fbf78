"""Small readers shared by the pipeline loaders (a leaf of `pqjax.pipelines`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pqjax.errors import CheckpointError


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
