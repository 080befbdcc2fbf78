"""SANA-1.5 from prompt to image in JAX: Gemma-2 prompts, the DPM-Solver++ loop, DC-AE decoding.

    pipe = load_pipeline("sana-1.5-1.6b")    # a SanaPipeline folder, HF cache entry or short name
    images = pipe.generate(["a red fox in the snow"], seed=0)    # (1, 1024, 1024, 3) in [0, 1]

As diffusers' `SanaPipeline` (model card defaults: 20 steps, guidance 4.5, flow shift from the
scheduler config, 300 prompt tokens after the complex human instruction, negative prompt ""):
`sana_encode_prompt`, latents `(b, 32, H/32, W/32)`, `sana_sample`, `latents / scaling_factor`,
DC-AE decode, `x / 2 + 0.5` clipped. Resolution binning as diffusers' default
(`pqjax.pipelines.aspect_bins`): a requested size is generated at the closest trained aspect-ratio
bin, and the decoded image is resized and centre-cropped back to it. `resolution_binning=None`
(the default) bins wherever the transformer's sample size has a table; False uses the size as
given (a multiple of the autoencoder's factor).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import convert
from pqjax.models.dcae import AutoencoderDC
from pqjax.models.gemma2 import Gemma2Model
from pqjax.models.lm_prompts import SANA_MAX_SEQUENCE_LENGTH, sana_encode_prompt
from pqjax.models.lm_tokenizer import LMTokenizer
from pqjax.pipelines.aspect_bins import SAMPLE_SIZES, bin_size, check_size, resize_and_crop
from pqjax.pipelines.components import OnDemand, encoders_on_demand, held, read_json_object
from pqjax.pipelines.lm_pipeline import LMTextToImage
from pqjax.pipelines.sana import DEFAULT_GUIDANCE, DEFAULT_STEPS, SanaSchedule, sana_sample


@dataclasses.dataclass
class SanaTextToImage(LMTextToImage):
    """SANA transformer + Gemma-2 + DC-AE + the flow DPM-Solver++ schedule config."""

    transformer: Any
    text_encoder: Gemma2Model | OnDemand
    tokenizer: LMTokenizer
    vae: AutoencoderDC
    scheduler_config: dict[str, Any]
    num_steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    height: int = 1024
    width: int = 1024
    max_sequence_length: int = SANA_MAX_SEQUENCE_LENGTH
    source: str = ""
    quant_config: Any = None
    report: Any = None

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.spatial_compression

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor

    def encode(self, prompts: Sequence[str],
               negative_prompt: str | Sequence[str] | None = ""):
        return sana_encode_prompt(prompts, held(self.text_encoder), self.tokenizer,
                                  negative_prompt=negative_prompt,
                                  max_sequence_length=self.max_sequence_length)

    def image_size(self, height: int | None = None, width: int | None = None,
                   resolution_binning: bool | None = None) -> tuple[int, int]:
        """The (height, width) the transformer samples for a requested size: its aspect-ratio
        bin with binning (None: wherever the transformer's sample size has a table), else the
        size itself (checked later to be a multiple of the autoencoder's factor)."""
        height, width = height or self.height, width or self.width
        sample_size = int(self.transformer.config.sample_size)
        if resolution_binning is None:
            resolution_binning = sample_size in SAMPLE_SIZES
        if not resolution_binning:
            return height, width
        return bin_size(check_size("height", height), check_size("width", width), sample_size)

    def _prepare(self, prompts, seed, num_steps, guidance, height, width, latents,
                 negative_prompt, resolution_binning=None):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        height, width = self.image_size(height, width, resolution_binning)
        steps, g, height, width = self._settings(num_steps, guidance, height, width)
        noise = self._noise(len(prompts), seed, height, width, latents)  # checked first
        # The negative prompt is encoded only for classifier-free guidance (g > 1).
        embeds, mask, neg, neg_mask = self.encode(prompts, negative_prompt if g > 1 else None)
        schedule = SanaSchedule.from_config(self.scheduler_config, steps)
        return (self.transformer, noise, schedule, embeds, mask, neg, neg_mask), g

    def sample_latents(self, prompts: str | Sequence[str], *, seed: int = 0,
                       num_steps: int | None = None, guidance: float | None = None,
                       height: int | None = None, width: int | None = None,
                       latents: jax.Array | None = None,
                       negative_prompt: str | Sequence[str] = "",
                       resolution_binning: bool | None = None,
                       progress: bool = False) -> jax.Array:
        """Final latents `(b, 32, h/32, w/32)` float32 at the sampled size (h, w) =
        `image_size(height, width, resolution_binning)`, before decoding. `progress` is
        accepted for the FLUX pipeline's signature; this loop has no per-step bar."""
        args, g = self._prepare(prompts, seed, num_steps, guidance, height, width, latents,
                                negative_prompt, resolution_binning)
        return sana_sample(*args, guidance_scale=g)

    def generate(self, prompts: str | Sequence[str], *, height: int | None = None,
                 width: int | None = None, resolution_binning: bool | None = None,
                 **kwargs: Any) -> np.ndarray:
        """Images `(b, height, width, 3)` in [0, 1]: sampled at `image_size(...)`, decoded,
        then resized and centre-cropped to the requested size; keywords as `sample_latents`."""
        size = (height or self.height, width or self.width)
        latents = self.sample_latents(prompts, height=height, width=width,
                                      resolution_binning=resolution_binning, **kwargs)
        return self.decode(latents, size=size)

    def calibration_batches(self, prompts: Sequence[str], *, seed: int = 0,
                            num_steps: int | None = None, guidance: float | None = None,
                            height: int | None = None, width: int | None = None,
                            resolution_binning: bool | None = None
                            ) -> list[dict[str, jax.Array]]:
        """The transformer's inputs along the sampling trajectory of `prompts`, one batch per
        step: with guidance, the doubled batch `[negative; prompts]` the model really sees (at
        the sampled size, binned as `generate` bins it)."""
        args, g = self._prepare(prompts, seed, num_steps, guidance, height, width, None, "",
                                resolution_binning)
        model, _, schedule, embeds, mask, neg, neg_mask = args
        _, xs = sana_sample(*args, guidance_scale=g, trajectory=True)
        ctx, cmask = embeds, mask
        if g > 1:
            ctx, cmask = jnp.concatenate([neg, embeds]), jnp.concatenate([neg_mask, mask])
        t = schedule.model_timesteps(getattr(model.config, "timestep_scale", 1.0))
        batches = []
        for i in range(xs.shape[0]):
            x = jnp.concatenate([xs[i], xs[i]]) if g > 1 else xs[i]
            batches.append(dict(hidden_states=x.astype(ctx.dtype), encoder_hidden_states=ctx,
                                timestep=jnp.full((x.shape[0],), t[i], jnp.float32),
                                encoder_attention_mask=cmask))
        return batches

    def decode(self, latents: jax.Array, size: tuple[int, int] | None = None) -> np.ndarray:
        """latents `(b, 32, h, w)` -> images `(b, 32h, 32w, 3)` in [0, 1] (VaeImageProcessor);
        with `size` (height, width), resized and centre-cropped to it before clipping."""
        dtype = self.vae.decoder.conv_in.kernel[...].dtype
        z = latents.astype(dtype) / jnp.asarray(self.vae.config.scaling_factor, dtype)
        image = self.vae.decode(z).astype(jnp.float32)
        if size is not None:
            image = resize_and_crop(image, *size)
        return np.asarray(jnp.moveaxis(jnp.clip(image / 2 + 0.5, 0, 1), 1, -1))

    def _scheduler_settings(self) -> dict[str, Any]:
        return {"scheduler_config": self.scheduler_config}

    @staticmethod
    def _scheduler_fields(settings: dict[str, Any]) -> dict[str, Any]:
        return {"scheduler_config": settings["scheduler_config"]}


def load_sana(root: Path, dtype: Any = None, *, allow_pickle: bool = False,
              max_memory: Any = None, transformer: Any = None) -> SanaTextToImage:
    """A diffusers SanaPipeline folder (transformer/, text_encoder/, tokenizer/, vae/,
    scheduler/) as a JAX pipeline. max_memory: where all weights in `dtype` exceed it, Gemma-2
    stays on disk until each encoding (`OnDemand`). transformer: use this one instead of
    loading it (e.g. a `pqjax.engine.streamed.StreamedModel`)."""
    root = Path(root)
    on_demand = encoders_on_demand(root, ("text_encoder",), ("transformer", "vae"), dtype=dtype,
                                   allow_pickle=allow_pickle, max_memory=max_memory)
    sched_path = root / "scheduler" / "scheduler_config.json"
    config = read_json_object(sched_path)
    try:
        SanaSchedule.from_config(config, DEFAULT_STEPS)  # refuse a scheduler we cannot run now
    except ValueError as e:
        raise ValueError(f"{sched_path}: {e}") from e
    if transformer is None:
        transformer = convert.load_transformer(root, dtype=dtype, allow_pickle=allow_pickle)
    vae = convert.load_model(root / "vae", dtype=dtype, allow_pickle=allow_pickle)
    # SanaPipeline's default size: the transformer's sample_size in latents (1024 px for 1.5).
    size = int(transformer.config.sample_size) * vae.config.spatial_compression
    return SanaTextToImage(
        transformer=transformer,
        text_encoder=OnDemand(root / "text_encoder", dtype, allow_pickle) if on_demand
        else convert.load_model(root / "text_encoder", dtype=dtype, allow_pickle=allow_pickle),
        tokenizer=LMTokenizer.load(root / "tokenizer"),
        vae=vae,
        scheduler_config=config,
        height=size,
        width=size,
        source=str(root),
    )
