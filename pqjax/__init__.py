"""pqjax: PermuQuant post-training quantization of diffusion transformers in JAX/Pallas.

    import pqjax
    pipe = pqjax.convert_and_quantize()            # the embedded trained tiny FLUX, NVFP4 W4A4
    images = pipe.generate(["a handwritten digit 7"], seed=0)
    pqjax.save(pipe, "out/q"); pipe = pqjax.restore("out/q")
    print(pqjax.estimate_memory("flux-dev").to_markdown())   # full-size bytes, no weights needed

    calib = pqjax.calibrate(model, batches)        # or piece by piece, on any NNX DiT
    qmodel, report = pqjax.quantize(model, calib, pqjax.QuantConfig(weights="int4", group=64))

    pqjax.streaming.stream_quantize(...)           # block by block (imported on first use)
"""

import importlib
from typing import Any

from pqjax.api import calibrate_pipeline, convert_and_quantize, quantize_pipeline
from pqjax.calibrate import calibrate
from pqjax.checkpoint import restore, save
from pqjax.layers import QuantLinear, set_backend
from pqjax.memory import MemoryEstimate, estimate_memory
from pqjax.methods import Plan, method_names, register_method
from pqjax.pipelines.load import EMBEDDED, load_pipeline
from pqjax.pipelines.pipeline import Pipeline
from pqjax.quantize import QuantConfig, quantize
from pqjax.report import QuantReport

# Submodules imported on first attribute access, so `import pqjax` stays light and
# `pqjax.streaming` works without its own import line.
_LAZY_SUBMODULES = ("streaming",)


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"pqjax.{name}")
    raise AttributeError(f"module 'pqjax' has no attribute {name!r}")


__all__ = [
    "EMBEDDED",
    "MemoryEstimate",
    "Pipeline",
    "Plan",
    "QuantConfig",
    "QuantLinear",
    "QuantReport",
    "calibrate",
    "calibrate_pipeline",
    "convert_and_quantize",
    "estimate_memory",
    "load_pipeline",
    "method_names",
    "quantize",
    "quantize_pipeline",
    "register_method",
    "restore",
    "save",
    "set_backend",
    "streaming",
]
