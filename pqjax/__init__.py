"""pqjax: PermuQuant post-training quantization of diffusion transformers in JAX/Pallas.

    import pqjax
    pipe = pqjax.convert_and_quantize()            # the embedded trained tiny FLUX, NVFP4 W4A4
    images = pipe.generate(["a handwritten digit 7"], seed=0)
    pqjax.save(pipe, "out/q"); pipe = pqjax.restore("out/q")
    print(pqjax.estimate_memory("flux-dev").to_markdown())   # full-size bytes, no weights needed

    calib = pqjax.calibrate(model, batches)        # or piece by piece, on any NNX DiT
    qmodel, report = pqjax.quantize(model, calib, pqjax.QuantConfig(weights="int4", group=64))

    pqjax.stream_quantize("flux-dev", batches, config, "runs/q")   # one block in memory

Every name, and every submodule (`pqjax.formats`, `pqjax.permute`, ...), is imported on first
use, so `import pqjax.formats` (as `pallas_kernels` does) loads only the formats.
"""

import importlib
import importlib.util
import sys
import types
from typing import Any

# public name -> the module that defines it
_PUBLIC = {
    "EMBEDDED": "pqjax.pipelines.load",
    "MemoryEstimate": "pqjax.memory",
    "Pipeline": "pqjax.pipelines.pipeline",
    "Plan": "pqjax.methods",
    "QuantConfig": "pqjax.quantize",
    "QuantLinear": "pqjax.layers",
    "QuantReport": "pqjax.report",
    "calibrate": "pqjax.calibrate",
    "calibrate_pipeline": "pqjax.api",
    "convert_and_quantize": "pqjax.api",
    "estimate_memory": "pqjax.memory",
    "load_pipeline": "pqjax.pipelines.load",
    "method_names": "pqjax.methods",
    "quantize": "pqjax.engine",
    "quantize_pipeline": "pqjax.api",
    "register_method": "pqjax.methods",
    "restore": "pqjax.checkpoint",
    "save": "pqjax.checkpoint",
    "set_backend": "pqjax.backends",
    "stream_quantize": "pqjax.engine",
}
# public functions named like a submodule: `pqjax.quantize` is the function, though importing
# the module pqjax.quantize sets the package attribute
_SHADOWED = frozenset({"calibrate", "quantize"})


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        # importing pqjax.quantize sets the package attribute to the submodule; keep the function
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
    elif importlib.util.find_spec(f"pqjax.{name}") is not None:
        value = importlib.import_module(f"pqjax.{name}")
    else:
        raise AttributeError(f"module 'pqjax' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


sys.modules[__name__].__class__ = _Package

__all__ = sorted([*_PUBLIC, "engine"])
