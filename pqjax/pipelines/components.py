"""Small readers shared by the pipeline loaders, and text encoders kept on disk until used (a
leaf of `pqjax.pipelines`)."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pqjax.errors import CheckpointError
from pqjax.host_memory import trim


@dataclasses.dataclass(frozen=True)
class OnDemand:
    """A model left in its folder: `held(component)` loads it for one use and the caller drops
    it afterwards, so it occupies memory only while it runs (text encoders under a memory
    budget: encode the prompts, release the encoder, then sample)."""

    folder: Path
    dtype: Any = None  # None: the checkpoint's own
    allow_pickle: bool = False
    on_demand = True  # not a field: what `held` looks for

    def load(self) -> Any:
        import convert

        return convert.load_model(self.folder, dtype=self.dtype, allow_pickle=self.allow_pickle)


def held(component: Any) -> Any:
    """The model itself: loaded now if `component` is kept on disk (`OnDemand`, or any object
    with `on_demand` set and a `load()`, such as `pqjax.engine.result.StoredModel`), after
    the memory freed since the last load went back to the OS."""
    if not getattr(component, "on_demand", False):
        return component
    trim()
    return component.load()


def for_sampling(component: Any) -> Any:
    """The model a sampler runs: a transformer kept on disk loads now; one that asks to be run
    block by block (`sampling_model()`, e.g. `pqjax.engine.result.StoredModel`) comes as a
    model that runs one jitted block at a time (samplers see its `eager` and loop in Python).
    Under such a budget, the memory the prompts' encoding freed goes back to the OS first."""
    if any(getattr(component, a, False) for a in ("on_demand", "eager", "sampling_model")):
        trim()
    if hasattr(component, "sampling_model"):
        return component.sampling_model()
    return held(component)


def parse_bytes(value: int | float | str | None, what: str = "max_memory") -> int | None:
    """A byte count: a number, or a string such as "16GiB", "24 GB", "512MiB" (None: none)."""
    if value is None:
        return None
    given = value
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        digits = text.rstrip("kmgtib")
        unit = text[len(digits):]
        try:
            number = float(digits)
        except ValueError:
            number = float("nan")
        if unit not in units:
            number = float("nan")
        value = number * units.get(unit, 1)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0 \
            or value == float("inf"):
        raise ValueError(f"{what} must be a positive byte count such as 16e9 or '16GiB', "
                         f"got {given!r}")
    return int(value)


def encoders_on_demand(root: Path, encoders: Sequence[str], others: Sequence[str], *,
                       dtype: Any, allow_pickle: bool = False, max_memory: Any = None,
                       extra_bytes: int = 0) -> bool:
    """Whether the pipeline in `root` keeps its text encoders (the component folders
    `encoders`) on disk: where its weights (those folders, `others` and `extra_bytes`, sized
    from the checkpoint headers in `dtype`) exceed `max_memory`. Says so when it does."""
    budget = parse_bytes(max_memory)
    if budget is None:
        return False
    import convert

    def size(name: str) -> int:
        return convert.weight_bytes(Path(root) / name, dtype=dtype, allow_pickle=allow_pickle)

    enc = sum(size(n) for n in encoders)
    total = enc + sum(size(n) for n in others) + extra_bytes
    if total <= budget:
        return False
    print(f"pqjax: the pipeline's weights ({human_bytes(total)}) exceed max_memory "
          f"({human_bytes(budget)}): its text encoders ({human_bytes(enc)}) load for each "
          "encoding and are released before sampling", file=sys.stderr)
    return True


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


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


def load_lm_parts(folder: Path, transformer: Any = None, max_memory: Any = None
                  ) -> tuple[Any, Any, Any, dict[str, Any]]:
    """(text_encoder, tokenizer, vae, settings) written by `save_lm_parts`; the text encoder
    `OnDemand` where its weights, the vae's and the (restored) `transformer`'s exceed
    `max_memory`."""
    import convert
    from pqjax.models.lm_tokenizer import LMTokenizer

    folder = Path(folder)
    on_demand = encoders_on_demand(folder, ("text_encoder",), ("vae",), dtype=None,
                                   max_memory=max_memory, extra_bytes=tree_bytes(transformer))
    text_encoder = (OnDemand(folder / "text_encoder") if on_demand
                    else convert.load_model(folder / "text_encoder"))
    return (text_encoder, LMTokenizer.load(folder / "tokenizer"),
            convert.load_model(folder / "vae"), read_json_object(folder / "settings.json"))


def tree_bytes(module: Any) -> int:
    """The bytes of a module's arrays (0 for None)."""
    if module is None:
        return 0
    import jax
    from flax import nnx

    return sum(int(x.nbytes) for x in jax.tree.leaves(nnx.state(module)) if hasattr(x, "nbytes"))
