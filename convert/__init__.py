"""The diffusers <-> Flax NNX bridge. Torch is imported only for opt-in pickled weights.

from convert import load_transformer, export_transformer
model = load_transformer("flux-dev")          # local folder, HF cache entry or short name
model = load_transformer("tiny-flux-digits")  # the model embedded in pqjax/assets/
export_transformer(model, "out/transformer")  # diffusers-loadable safetensors + config.json
"""

from convert.export import export_model, export_transformer
from convert.loader import load_model, load_transformer, weight_bytes
from convert.resolve import EMBEDDED_MODELS, SHORT_NAMES, ModelNotFoundError, resolve
from convert.safetensors_io import Checkpoint, CheckpointError

__all__ = [
    "EMBEDDED_MODELS",
    "SHORT_NAMES",
    "Checkpoint",
    "CheckpointError",
    "ModelNotFoundError",
    "export_model",
    "export_transformer",
    "load_model",
    "load_transformer",
    "resolve",
    "weight_bytes",
]
