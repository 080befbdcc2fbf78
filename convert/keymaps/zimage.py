"""Z-Image transformer: module names mirror diffusers (`all_x_embedder.2-1` is an nnx.Dict
entry, pad tokens are raw params), so no key renames are needed."""

from convert.registry import ModelSpec
from pqjax.models.zimage import ZImageConfig, ZImageTransformer2DModel

SPECS = [
    ModelSpec(
        "ZImageTransformer2DModel",
        ZImageTransformer2DModel,
        ZImageConfig,
        block_counts=(("layers", "n_layers"), ("noise_refiner", "n_refiner_layers"),
                      ("context_refiner", "n_refiner_layers")),
    )
]
