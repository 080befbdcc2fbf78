"""transformers `CLIPTextModel` <-> `pqjax.models.clip.CLIPTextModel`.

The NNX tree mirrors the published layout `text_model.*` (transformers 4.x, FLUX.1's
`text_encoder/`), so those checkpoints load by rule and exports load in transformers 4.x and 5.x.
transformers >= 5 saves the same tensors without the `text_model.` prefix;
`map_checkpoint_keys` adds it back, and drops the `position_ids` buffer that transformers < 4.31
saved.
"""

from __future__ import annotations

from convert.registry import ModelSpec
from pqjax.models.clip import CLIPTextConfig, CLIPTextModel, read_config, write_config

PREFIX = "text_model."


def map_checkpoint_keys(keys: list[str]) -> dict[str, str | None]:
    """Checkpoint key -> model key (None: not a parameter) for the keys that differ."""
    out: dict[str, str | None] = {}
    for key in keys:
        model_key = key if key.startswith(PREFIX) else PREFIX + key
        if model_key.endswith("embeddings.position_ids"):
            out[key] = None
        elif model_key != key:
            out[key] = model_key
    return out



SPECS = [
    ModelSpec(
        "CLIPTextModel",
        CLIPTextModel,
        CLIPTextConfig,
        weights_name="model",
        read_config=read_config,
        write_config=write_config,
        map_keys=map_checkpoint_keys,
        block_counts=(("text_model.encoder.layers", "num_hidden_layers"),),
    )
]
