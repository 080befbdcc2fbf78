"""diffusers AutoencoderKL (FLUX / SD VAEs): module names mirror diffusers, no key renames.

config.json is read strictly (every field is an `AutoencoderKLConfig` field) and written back
with all fields, so `convert.export_model` output loads with `AutoencoderKL.from_pretrained`.
"""

from convert.registry import ModelSpec
from pqjax.models.vae import AutoencoderKL, AutoencoderKLConfig

SPECS = [
    ModelSpec(
        "AutoencoderKL",
        AutoencoderKL,
        AutoencoderKLConfig,
        weights_name="diffusion_pytorch_model",
        block_counts=(("encoder.down_blocks", "block_out_channels"),
                      ("decoder.up_blocks", "block_out_channels"),
                      ("encoder.down_blocks.0.resnets", "layers_per_block")),
    )
]
