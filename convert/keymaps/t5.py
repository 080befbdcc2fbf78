"""transformers `T5EncoderModel` <-> `pqjax.models.t5.T5EncoderModel`.

Module names mirror transformers. transformers ties `encoder.embed_tokens.weight` to
`shared.weight` and `save_pretrained` (4.x and 5.x) writes only `shared.weight`, which is what
FLUX.1's `text_encoder_2/` holds; that layout loads by rule. `map_checkpoint_keys` also accepts
checkpoints that store the tied copy (dropped when `shared.weight` is present, else used as
`shared.weight`) and drops `decoder.*`, which transformers' T5EncoderModel ignores too.
"""

from __future__ import annotations

from convert.registry import ModelSpec
from pqjax.models.t5 import T5Config, T5EncoderModel, read_config, write_config

TIED = "encoder.embed_tokens.weight"
SHARED = "shared.weight"


def map_checkpoint_keys(keys: list[str]) -> dict[str, str | None]:
    """Checkpoint key -> model key (None: skip) for the keys that differ."""
    out: dict[str, str | None] = {k: None for k in keys if k.startswith("decoder.")}
    if TIED in keys:
        out[TIED] = None if SHARED in keys else SHARED
    return out



SPECS = [
    ModelSpec(
        "T5EncoderModel",
        T5EncoderModel,
        T5Config,
        weights_name="model",
        read_config=read_config,
        write_config=write_config,
        map_keys=map_checkpoint_keys,
        block_counts=(("encoder.block", "num_layers"),),
    )
]
