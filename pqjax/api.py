"""The one-call entry point: convert -> calibrate -> permute -> quantize, in a memory budget.

pipe = pqjax.convert_and_quantize()                            # the embedded tiny model
pipe = pqjax.convert_and_quantize("flux-dev", pqjax.QuantConfig(weights="nvfp4"),
                                  max_memory="16GiB")          # block by block if it must
images = pipe.generate(["a handwritten digit 7"], seed=0)

Both paths run the same engine (`pqjax.engine`): in memory, the whole full-precision model is
loaded and sampled in one jit; streamed, it is read one block at a time from disk, for the
calibration trajectories and for the quantization, and the finished blocks go to a work
folder that a rerun of the same call resumes from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pqjax.calibrate import Calibration, calibrate
from pqjax.pipelines.components import human_bytes, parse_bytes
from pqjax.pipelines.load import EMBEDDED, load_pipeline, resolve_root
from pqjax.pipelines.pipeline import Pipeline
from pqjax.quantize import QuantConfig

# Generic prompts for text-to-image models without a prompt table of their own.
GENERIC_CALIB_PROMPTS = (
    "a photo of a red fox in the snow, golden hour",
    "an astronaut riding a horse on mars, digital art",
    "a bowl of ramen on a wooden table, studio lighting",
    "a watercolor painting of a lighthouse at dawn",
    "a close-up portrait of an old fisherman, film grain",
    "a futuristic city skyline at night with neon signs",
    "a cat wearing sunglasses sitting on a skateboard",
    "the text 'PermuQuant' written on a chalkboard",
)
HOST_SHARE = 0.8  # of the host's RAM, the default budget on a CPU


def default_calib_prompts(pipe: Any) -> list[str]:
    """The model's own calibration prompts if it has them, else a generic set."""
    own = getattr(pipe.text_encoder, "calibration_prompts", None)
    return list(own()) if callable(own) else list(GENERIC_CALIB_PROMPTS)


def calibrate_pipeline(
    pipe: Pipeline,
    prompts: Sequence[str] | None = None,
    *,
    seed: int = 0,
    num_steps: int | None = None,
    height: int | None = None,
    width: int | None = None,
    n_rows: int = 256,
    track_batches: int = 0,
    progress: bool = True,
) -> Calibration:
    """Statistics of every Linear of `pipe`'s transformer along its own sampling trajectories
    (at the pipeline's default resolution and number of steps unless given). track_batches:
    also keep per-step absmax (one calibration batch per sampling step)."""
    prompts = list(prompts) if prompts else default_calib_prompts(pipe)
    batches = pipe.calibration_batches(
        prompts, seed=seed, num_steps=num_steps, height=height, width=width
    )
    return calibrate(pipe.transformer, batches, n_rows=n_rows, seed=seed,
                     forward=getattr(pipe, "calibration_forward", None),
                     track_batches=track_batches, progress=progress)


def quantize_pipeline(
    pipe: Pipeline, calib: Calibration, config: QuantConfig | None = None
) -> Pipeline:
    """A copy of `pipe` whose transformer is quantized with `config` (report attached)."""
    from pqjax.engine import quantize

    config = config or QuantConfig()
    qmodel, report = quantize(pipe.transformer, calib, config)
    return pipe.with_transformer(qmodel, quant_config=config, report=report)


def default_budget() -> int:
    """The memory the headline call plans for: the accelerator's, or a share of host RAM."""
    import jax

    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return int(HOST_SHARE * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


@dataclasses.dataclass(frozen=True)
class PathChoice:
    """Which path `convert_and_quantize` takes, and why (`reason` is printed)."""

    stream: bool
    reason: str
    quantized_bytes: int


def choose_path(root: Path, config: QuantConfig, budget: int, *, dtype: Any = None,
                allow_pickle: bool = False) -> PathChoice:
    """In memory when the full-precision transformer, its quantized copy and the VAE fit
    `budget` (sized from the checkpoint headers and the config, nothing loaded), else
    streamed block by block."""
    import convert
    from convert.loader import ModelWeights
    from pqjax.inventory import inventory
    from pqjax.memory import transformer_bytes

    weights = ModelWeights(convert.resolve(root, "transformer"), dtype=dtype,
                           allow_pickle=allow_pickle)
    fp = weights.nbytes()
    quant = transformer_bytes(inventory(weights.config), config)["quantized_bytes"]
    vae = (convert.weight_bytes(root / "vae", dtype=dtype, allow_pickle=allow_pickle)
           if (root / "vae").is_dir() else 0)
    need = fp + quant + vae
    what = (f"the transformer ({human_bytes(fp)} in {weights.dtype.name}), its quantized copy "
            f"({human_bytes(quant)}) and the VAE ({human_bytes(vae)}) need {human_bytes(need)}")
    if need <= budget:
        return PathChoice(False, f"in memory: {what}, within {human_bytes(budget)}", quant)
    return PathChoice(True, f"block by block: {what}, over the budget of {human_bytes(budget)}",
                      quant)


def convert_and_quantize(
    name_or_path: str | os.PathLike = EMBEDDED,
    config: QuantConfig | None = None,
    calib_prompts: Sequence[str] | None = None,
    *,
    calib_seed: int = 0,
    calib_steps: int | None = None,
    height: int | None = None,
    width: int | None = None,
    n_rows: int = 256,
    dtype: Any = None,
    progress: bool = True,
    allow_pickle: bool = False,
    max_memory: int | str | None = None,
    work_dir: str | os.PathLike | None = None,
    backend: str = "xla",
) -> Pipeline:
    """Load `name_or_path` (default: the embedded trained tiny FLUX), calibrate it on its own
    sampling trajectories for `calib_prompts` (at `height` x `width`, `calib_steps` steps;
    the pipeline's defaults unless given), and quantize its transformer with `config`.

    max_memory (bytes or e.g. "16GiB"; default: the accelerator's memory, or 80% of host RAM
    on a CPU): where the full-precision transformer, its quantized copy and the VAE exceed it,
    the transformer is read from disk one block at a time, for the trajectories and for the
    quantization, with finished blocks in `work_dir` (default: a folder under
    ~/.cache/pqjax/work named by the call's arguments), where a rerun of the same call
    resumes. The path taken, and why, is printed. Text encoders load for each encoding and are
    released when all weights exceed the budget; so is the quantized transformer, which then
    stays in `work_dir` and loads only to sample. dtype: of the loaded weights (None: each
    checkpoint's own, bf16 for FLUX.1-dev). allow_pickle: also load pickled `.bin`/`.pt`
    weights (torch, `weights_only=True`). backend: of the quantized layers
    (`pqjax.set_backend`). progress: bars over calibration and the engine's stages.
    """
    from pqjax.backends import BACKENDS, set_backend
    from pqjax.engine import quantize_blocks

    config = config or QuantConfig()
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: choose one of {BACKENDS}")
    budget = parse_bytes(max_memory) if max_memory is not None else default_budget()
    root = resolve_root(name_or_path)
    choice = choose_path(root, config, budget, dtype=dtype, allow_pickle=allow_pickle)
    print(f"pqjax: quantizing {name_or_path} {choice.reason}", file=sys.stderr)
    prompts = list(calib_prompts) if calib_prompts else None
    size = dict(num_steps=calib_steps, height=height, width=width)
    if not choice.stream:
        pipe = load_pipeline(root, dtype=dtype, allow_pickle=allow_pickle,
                             max_memory=max_memory)
        batches = pipe.calibration_batches(prompts or default_calib_prompts(pipe),
                                           seed=calib_seed, **size)
        qmodel, report = quantize_blocks(pipe.transformer, batches, config, n_rows=n_rows,
                                         seed=calib_seed, progress=progress)
    else:
        pipe, qmodel, report = _streamed(root, config, prompts, calib_seed, size, n_rows, dtype,
                                         allow_pickle, budget, work_dir, progress, choice)
    if not getattr(qmodel, "on_demand", False):
        set_backend(qmodel, backend)
    pipe = pipe.with_transformer(qmodel, quant_config=config, report=report)
    pipe.source = str(name_or_path)
    return pipe


def _streamed(root: Path, config: QuantConfig, prompts: list[str] | None, seed: int,
              size: dict[str, Any], n_rows: int, dtype: Any, allow_pickle: bool, budget: int,
              work_dir: Any, progress: bool, choice: PathChoice) -> tuple[Any, Any, Any]:
    """The streamed path: trajectories and quantization one block at a time."""
    from pqjax.engine import stream_quantize
    from pqjax.engine.result import StoredModel
    from pqjax.engine.sources import CheckpointSource
    from pqjax.engine.streamed import StreamedModel

    source = CheckpointSource(root, dtype=dtype, allow_pickle=allow_pickle)
    streamed = StreamedModel(source)
    pipe = load_pipeline(root, dtype=dtype, allow_pickle=allow_pickle, max_memory=budget,
                         transformer=streamed)
    prompts = prompts or default_calib_prompts(pipe)
    work = Path(work_dir) if work_dir is not None else _default_work_dir(
        root, config, prompts, seed, size, n_rows, source.weights.dtype.name)
    print(f"pqjax: work folder {work} (a rerun of this call resumes there)", file=sys.stderr)
    batches = pipe.calibration_batches(prompts, seed=seed, **size)
    keep = choice.quantized_bytes + _largest_encoder(root, dtype, allow_pickle) <= budget
    del streamed
    qmodel, report = stream_quantize(root, batches, config, work, dtype=dtype, n_rows=n_rows,
                                     seed=seed, allow_pickle=allow_pickle, progress=progress,
                                     assemble=keep)
    if not keep:
        print(f"pqjax: the quantized transformer ({human_bytes(choice.quantized_bytes)}) and "
              f"the largest text encoder exceed the budget together: it stays in {work} and "
              "loads to sample, after the prompts are encoded", file=sys.stderr)
        qmodel = StoredModel(work)
    return pipe, qmodel, report


def _largest_encoder(root: Path, dtype: Any, allow_pickle: bool) -> int:
    import convert

    sizes = [convert.weight_bytes(p, dtype=dtype, allow_pickle=allow_pickle)
             for p in sorted(root.glob("text_encoder*")) if (p / "config.json").is_file()]
    return max(sizes, default=0)


def _default_work_dir(root: Path, config: QuantConfig, prompts: list[str], seed: int,
                      size: dict[str, Any], n_rows: int, dtype: str) -> Path:
    """~/.cache/pqjax/work/<digest of what the run is>: the same call finds the same folder."""
    from pqjax.compile_cache import user_dir

    what = json.dumps([str(root), dataclasses.asdict(config), prompts, seed, size, n_rows, dtype],
                      sort_keys=True, default=str)
    return user_dir() / "work" / hashlib.sha256(what.encode()).hexdigest()[:16]
