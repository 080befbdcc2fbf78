"""The one-call entry point: convert -> calibrate -> permute -> quantize.

pipe = pqjax.convert_and_quantize()                            # the embedded tiny model
pipe = pqjax.convert_and_quantize("flux-dev", pqjax.QuantConfig(weights="nvfp4"))
images = pipe.generate(["a handwritten digit 7"], seed=0)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from pqjax.calibrate import Calibration, calibrate
from pqjax.pipelines.load import EMBEDDED, load_pipeline
from pqjax.pipelines.pipeline import Pipeline
from pqjax.quantize import QuantConfig, quantize

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


def default_calib_prompts(pipe: Pipeline) -> list[str]:
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
    config = config or QuantConfig()
    qmodel, report = quantize(pipe.transformer, calib, config)
    return pipe.with_transformer(qmodel, quant_config=config, report=report)


def convert_and_quantize(
    name_or_path: str | os.PathLike = EMBEDDED,
    config: QuantConfig | None = None,
    calib_prompts: Sequence[str] | None = None,
    *,
    calib_seed: int = 0,
    calib_steps: int | None = None,
    n_rows: int = 256,
    dtype: Any = None,
    progress: bool = True,
    allow_pickle: bool = False,
    max_memory: int | str | None = None,
) -> Pipeline:
    """Load `name_or_path` (default: the embedded trained tiny FLUX), calibrate it on its own
    sampling trajectories for `calib_prompts`, and quantize its transformer with `config`.
    dtype: of the loaded weights (None: each checkpoint's own, bf16 for FLUX.1-dev).
    allow_pickle: also load pickled `.bin`/`.pt` weights (torch, `weights_only=True`).
    max_memory (bytes or e.g. "16GiB"): where all weights exceed it, the text encoders load
    for calibration's encoding and are released before sampling (see `load_pipeline`)."""
    pipe = load_pipeline(name_or_path, dtype=dtype, allow_pickle=allow_pickle,
                         max_memory=max_memory)
    calib = calibrate_pipeline(
        pipe,
        calib_prompts,
        seed=calib_seed,
        num_steps=calib_steps,
        n_rows=n_rows,
        progress=progress,
    )
    return quantize_pipeline(pipe, calib, config)
