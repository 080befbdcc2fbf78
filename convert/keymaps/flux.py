"""FLUX.1 transformer: module names mirror diffusers, so no key renames are needed."""

from convert.registry import ModelSpec
from pqjax.models.flux import FluxConfig, FluxTransformer2DModel

SPECS = [
    ModelSpec(
        "FluxTransformer2DModel",
        FluxTransformer2DModel,
        FluxConfig,
        block_counts=(("transformer_blocks", "num_layers"),
                      ("single_transformer_blocks", "num_single_layers")),
    )
]
