"""The quantization engine: every method, block by block, in memory or streamed from disk.

    qmodel, report = quantize(model, calib, config)              # statistics given (pqjax.quantize)
    qmodel, report = quantize_blocks(model, batches, config)     # computed block by block
    qmodel, report = stream_quantize("flux-dev", batches, config, "runs/flux-q")   # from disk

All three run the same stages (`pqjax.engine.stages`): each transformer block is calibrated,
decided by the method (`pqjax.methods`, with the block's own sites) and quantized
(`pqjax.quantize.apply_plan`) in execution order; then the model stage decides the sites
that span blocks (FLUX's temb: every AdaLN linear reads it) together with the layers outside
the blocks. `stream_quantize` holds one full-precision block in memory at a time (plus, in
the model stage, the layers that stage quantizes), writes each finished block to `work_dir`,
and resumes an interrupted run there, refusing a folder that holds other work
(`pqjax.engine.store`). With the same calibration inputs it gives the same model as
`quantize_blocks`, bit for bit: the same programs run on the same arrays.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from flax import nnx

from pqjax.calibrate import Calibration, calibrate
from pqjax.engine.calibration import Blockwise, Given
from pqjax.engine.run import run
from pqjax.engine.sources import CheckpointSource, ModelSource, new_digest
from pqjax.engine.stages import Stages
from pqjax.engine.store import FORMAT, MemoryStore, StreamInterrupted, WorkDir, batches_sha256
from pqjax.quantize import QuantConfig
from pqjax.report import QuantReport

__all__ = ["StreamInterrupted", "quantize", "quantize_blocks", "stream_quantize"]


def quantize(model: nnx.Module, calib: Calibration, config: QuantConfig | None = None, *,
             progress: bool = False) -> tuple[nnx.Module, QuantReport]:
    """Quantize `model` (unchanged) with `config.method` on the statistics `calib` (of the
    whole model, `pqjax.calibrate`); returns (quantized model, report). progress: a bar over
    the stages."""
    config = config or QuantConfig()
    stages = Stages.of(model, config)
    return run(ModelSource(model), stages, Given(calib, stages.blocks), MemoryStore(), config,
               progress=progress)


def quantize_blocks(model: nnx.Module, batches: Sequence[dict[str, Any]],
                    config: QuantConfig | None = None, *, n_rows: int = 256, seed: int = 0,
                    progress: bool = True) -> tuple[nnx.Module, QuantReport]:
    """Calibrate `model` (unchanged) on `batches` block by block and quantize it; the
    in-memory twin of `stream_quantize`. A model without a family record's block runner is
    calibrated whole (`pqjax.calibrate`)."""
    config = config or QuantConfig()
    stages = Stages.of(model, config)
    if not stages.blocks:
        calib = calibrate(model, batches, n_rows=n_rows, seed=seed, progress=progress)
        return quantize(model, calib, config, progress=progress)
    fam = stages.family
    stats = Blockwise(fam.runner, fam.block_lists, batches, n_rows=n_rows, seed=seed)
    return run(ModelSource(model), stages, stats, MemoryStore(), config, progress=progress)


def stream_quantize(
    source: str | os.PathLike,
    batches: Sequence[dict[str, Any]],
    config: QuantConfig | None,
    work_dir: str | os.PathLike,
    *,
    dtype: Any = None,
    n_rows: int = 256,
    seed: int = 0,
    resume: bool = True,
    allow_pickle: bool = False,
    progress: bool = True,
    assemble: bool = True,
    stop_after: int | None = None,
) -> tuple[nnx.Module | None, QuantReport]:
    """Quantize the transformer at `source` (a name or folder) one block in memory at a time.

    batches: the transformer's inputs along full-precision trajectories (`calibration_batches`
    of its pipeline; loaded with `transformer=StreamedModel(CheckpointSource(source))`
    (`pqjax.engine.streamed`) for a model larger than memory); dtype: of the weights (None:
    the checkpoint's own). Finished blocks go to `work_dir`; rerunning the same call resumes
    there (resume=False refuses a folder that holds a run). assemble=False leaves the result
    in `work_dir` (`load_result`) and returns (None, report). stop_after: stop after that many
    blocks (tests of resumption).
    """
    config = config or QuantConfig()
    src = CheckpointSource(source, dtype=dtype, allow_pickle=allow_pickle)
    stages = Stages.of(src.abstract, config)
    if not batches:
        raise ValueError("stream_quantize: no calibration batches were given")
    digest = new_digest()
    shell = src.shell(digest)
    identity = {
        "engine": FORMAT,
        "source": {**src.fingerprint(), "shell_sha256": digest.hexdigest()},
        "transformer": transformer_meta(src.abstract),
        "calibration": {"batches": len(batches), "sha256": batches_sha256(list(batches)),
                        "n_rows": n_rows, "seed": seed},
        "config": dataclasses.asdict(config),
    }
    store = WorkDir(work_dir, identity, resume=resume)
    fam = stages.family
    stats = Blockwise(fam.runner, fam.block_lists, batches, n_rows=n_rows, seed=seed)
    return run(src, stages, stats, store, config, shell=shell, digest=new_digest,
               progress=progress, stop_after=stop_after, assemble=assemble, carries=True)


def transformer_meta(model: nnx.Module) -> dict[str, Any]:
    """The model's class and config as a checkpoint records them."""
    from convert import registry

    spec = registry.spec_for_model(model)
    return {"class_name": spec.class_name, "config": spec.dump(model.config)}
