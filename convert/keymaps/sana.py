"""SANA transformer: module names mirror diffusers, so no key renames are needed.

`patch_embed.pos_embed` is a non-persistent buffer in diffusers (absent from checkpoints); the
NNX model recomputes it from the config.
"""

from convert.registry import ModelSpec
from pqjax.models.sana import SanaConfig, SanaTransformer2DModel

SPECS = [
    ModelSpec(
        "SanaTransformer2DModel",
        SanaTransformer2DModel,
        SanaConfig,
        block_counts=(("transformer_blocks", "num_layers"),),
    )
]
