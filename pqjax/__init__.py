"""pqjax: PermuQuant post-training quantization of diffusion transformers in JAX/Pallas.

import pqjax
calib = pqjax.calibrate(model, batches)
qmodel, report = pqjax.quantize(model, calib, pqjax.QuantConfig(weights="nvfp4", acts="nvfp4"))
"""

from pqjax.calibrate import calibrate
from pqjax.layers import QuantLinear, set_backend
from pqjax.methods import Plan, method_names, register_method
from pqjax.quantize import QuantConfig, quantize
from pqjax.report import QuantReport

__all__ = [
    "Plan",
    "QuantConfig",
    "QuantLinear",
    "QuantReport",
    "calibrate",
    "method_names",
    "quantize",
    "register_method",
    "set_backend",
]
