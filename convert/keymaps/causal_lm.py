"""transformers `Gemma2Model` / `Qwen3Model` <-> `pqjax.models.gemma2` / `pqjax.models.qwen3`.

Module names mirror transformers, so `save_pretrained` of the base model loads by rule
(SANA's `text_encoder/` holds a `Gemma2Model`, Z-Image's a `Qwen3Model`). A checkpoint saved
from the causal-LM class nests the same weights under `model.` and adds `lm_head.weight`:
`map_checkpoint_keys` strips the prefix and skips the head, which no encoder reads.
"""

from __future__ import annotations

from convert.registry import ModelSpec
from pqjax.models import gemma2, qwen3


def map_checkpoint_keys(keys: list[str]) -> dict[str, str | None]:
    """Checkpoint key -> model key (None: skip) for the keys that differ."""
    out: dict[str, str | None] = {}
    for k in keys:
        if k == "lm_head.weight":
            out[k] = None
        elif k.startswith("model."):
            out[k] = k.removeprefix("model.")
    return out


SPECS = [
    ModelSpec("Gemma2Model", gemma2.Gemma2Model, gemma2.Gemma2Config, weights_name="model",
              read_config=gemma2.read_config, write_config=gemma2.write_config,
              map_keys=map_checkpoint_keys),
    ModelSpec("Qwen3Model", qwen3.Qwen3Model, qwen3.Qwen3Config, weights_name="model",
              read_config=qwen3.read_config, write_config=qwen3.write_config,
              map_keys=map_checkpoint_keys),
]
