"""diffusers AutoencoderDC (SANA's DC-AE): module names mirror diffusers, no key renames.

Only the decoder is built, so the checkpoint's `encoder.*` tensors are skipped. An export
therefore holds the decoder alone: pqjax reads it back, diffusers' `from_pretrained` would
need the encoder too.
"""

from __future__ import annotations

from convert.registry import ModelSpec
from pqjax.models.dcae import AutoencoderDC, AutoencoderDCConfig, read_config, write_config


def map_checkpoint_keys(keys: list[str]) -> dict[str, str | None]:
    return {k: None for k in keys if k.startswith("encoder.")}


SPECS = [
    ModelSpec("AutoencoderDC", AutoencoderDC, AutoencoderDCConfig,
              weights_name="diffusion_pytorch_model", read_config=read_config,
              write_config=write_config, map_keys=map_checkpoint_keys)
]
