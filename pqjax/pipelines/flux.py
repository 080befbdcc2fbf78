"""FLUX.1 (dev / schnell) in JAX: CLIP + T5 text encoders, the VAE decoder, the pipeline loader.

    pipe = load_pipeline("flux-dev")            # a local FluxPipeline folder / HF cache entry
    images = pipe.generate("a red fox in the snow", seed=0)   # (1, 1024, 1024, 3) in [0, 1]

Matches diffusers' FluxPipeline: prompt -> CLIP pooled + T5 sequence (512 tokens for dev, 256
for schnell), packed latents, img_ids, the resolution-shifted schedule, guidance embedding,
Euler steps, unpacking, `latents / scaling_factor + shift_factor`, VAE decode, `x / 2 + 0.5`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

import convert
from pqjax.models.tokenizers import FluxTokenizers, encode_prompt, load_tokenizers
from pqjax.models.vae import AutoencoderKL, latents_to_vae
from pqjax.pipelines.components import OnDemand, encoders_on_demand, held, read_json
from pqjax.pipelines.flow import FlowMatchEuler
from pqjax.pipelines.pipeline import Pipeline, SamplingDefaults

# (steps, guidance, T5 tokens) as FLUX.1's model cards recommend.
DEV_DEFAULTS = (28, 3.5, 512)
SCHNELL_DEFAULTS = (4, 0.0, 256)


@dataclasses.dataclass
class FluxTextEncoders:
    """CLIP-L (pooled) + T5 v1.1 XXL (sequence) with their tokenizers; each encoder either
    loaded or `OnDemand` (loaded for each `encode`, released after it)."""

    clip: Any
    t5: Any
    tokenizers: FluxTokenizers
    max_sequence_length: int = 512
    tokenizer_dirs: tuple[str, str] = ("", "")  # where the tokenizers were read from
    ENCODER_FOLDERS = ("text_encoder", "text_encoder_2")  # CLIP-L, T5 (not a field)

    def encode(self, prompts: list[str]) -> tuple[jax.Array, jax.Array, jax.Array]:
        return encode_prompt(prompts, held(self.clip), held(self.t5), self.tokenizers,
                             self.max_sequence_length)

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        convert.export_model(held(self.clip), folder / "text_encoder")
        convert.export_model(held(self.t5), folder / "text_encoder_2")
        for name, src in zip(("tokenizer", "tokenizer_2"), self.tokenizer_dirs):
            shutil.copytree(src, folder / name)
        (folder / "model_index.json").write_text(json.dumps(
            {"_class_name": "FluxTextEncoders", "max_sequence_length": self.max_sequence_length}))

    @classmethod
    def load(cls, folder: Path, dtype: Any = None, *,
             on_demand: bool = False) -> FluxTextEncoders:
        folder = Path(folder)
        meta = read_json(folder / "model_index.json")
        clip, t5 = (_encoder(folder / name, dtype, False, on_demand)
                    for name in cls.ENCODER_FOLDERS)
        return cls(
            clip=clip,
            t5=t5,
            tokenizers=load_tokenizers(folder),
            max_sequence_length=int(meta.get("max_sequence_length", 512)),
            tokenizer_dirs=(str(folder / "tokenizer"), str(folder / "tokenizer_2")),
        )


@dataclasses.dataclass
class VAEDecoder:
    """AutoencoderKL decode with FLUX's latent scaling; images `(b, H, W, 3)` in [0, 1]."""

    vae: AutoencoderKL

    def decode(self, latents: jax.Array) -> jax.Array:
        z = latents_to_vae(latents.astype(jnp.float32), self.vae.config)
        image = self.vae.decode(z.astype(self.vae.decoder.conv_in.kernel[...].dtype))
        image = jnp.clip(image.astype(jnp.float32) / 2 + 0.5, 0, 1)  # VaeImageProcessor
        return jnp.moveaxis(image, 1, -1)

    def save(self, folder: Path) -> None:
        convert.export_model(self.vae, Path(folder) / "vae")

    @classmethod
    def load(cls, folder: Path, dtype: Any = None) -> VAEDecoder:
        return cls(convert.load_model(Path(folder) / "vae", dtype=dtype))


ENCODER_FOLDERS = FluxTextEncoders.ENCODER_FOLDERS


def _encoder(folder: Path, dtype: Any, allow_pickle: bool, on_demand: bool) -> Any:
    if on_demand:
        return OnDemand(folder, dtype, allow_pickle)
    return convert.load_model(folder, dtype=dtype, allow_pickle=allow_pickle)


def load_flux(root: Path, dtype: Any = None, *, allow_pickle: bool = False,
              max_memory: Any = None, transformer: Any = None) -> Pipeline:
    """A diffusers FluxPipeline folder (dev or schnell) as a JAX Pipeline. max_memory: where
    the weights of all components in `dtype` exceed it, CLIP and T5 stay on disk until each
    encoding (`OnDemand`). transformer: use this one instead of loading it (e.g. a
    `pqjax.engine.streamed.StreamedModel`)."""
    on_demand = encoders_on_demand(root, ENCODER_FOLDERS, ("transformer", "vae"), dtype=dtype,
                                   allow_pickle=allow_pickle, max_memory=max_memory)
    if transformer is None:
        transformer = convert.load_transformer(root, dtype=dtype, allow_pickle=allow_pickle)
    steps, guidance, max_len = DEV_DEFAULTS if transformer.config.guidance_embeds \
        else SCHNELL_DEFAULTS
    clip, t5 = (_encoder(root / n, dtype, allow_pickle, on_demand) for n in ENCODER_FOLDERS)
    encoders = FluxTextEncoders(
        clip=clip,
        t5=t5,
        tokenizers=load_tokenizers(root),
        max_sequence_length=max_len,
        tokenizer_dirs=(str(root / "tokenizer"), str(root / "tokenizer_2")),
    )
    vae = convert.load_model(root / "vae", dtype=dtype, allow_pickle=allow_pickle)
    sched_path = root / "scheduler" / "scheduler_config.json"
    scheduler = FlowMatchEuler.from_config(read_json(sched_path), str(sched_path))
    defaults = SamplingDefaults(
        num_inference_steps=steps, guidance_scale=guidance, height=1024, width=1024,
        latent_channels=transformer.config.in_channels // 4,
        vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1),
    )
    return Pipeline(transformer, encoders, scheduler, VAEDecoder(vae), defaults, source=str(root))
