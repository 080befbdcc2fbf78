"""SANA-1.5 from prompt to image in JAX: Gemma-2 prompts, the DPM-Solver++ loop, DC-AE decoding.

    pipe = load_pipeline("sana-1.5-1.6b")    # a SanaPipeline folder, HF cache entry or short name
    images = pipe.generate(["a red fox in the snow"], seed=0)    # (1, 1024, 1024, 3) in [0, 1]

As diffusers' `SanaPipeline` (model card defaults: 20 steps, guidance 4.5, flow shift from the
scheduler config, 300 prompt tokens after the complex human instruction, negative prompt ""):
`sana_encode_prompt`, latents `(b, 32, H/32, W/32)`, `sana_sample`, `latents / scaling_factor`,
DC-AE decode, `x / 2 + 0.5` clipped. The size is used as given (a multiple of 32); diffusers'
default resolution binning maps sizes to its aspect-ratio bins first, which 1024 x 1024 is.
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
from pqjax.pipelines.components import read_json_object
from pqjax.pipelines.lm_pipeline import LMTextToImage
from pqjax.pipelines.sana import DEFAULT_GUIDANCE, DEFAULT_STEPS, SanaSchedule, sana_sample


@dataclasses.dataclass
class SanaTextToImage(LMTextToImage):
    """SANA transformer + Gemma-2 + DC-AE + the flow DPM-Solver++ schedule config."""

    transformer: Any
    text_encoder: Gemma2Model
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
        return sana_encode_prompt(prompts, self.text_encoder, self.tokenizer,
                                  negative_prompt=negative_prompt,
                                  max_sequence_length=self.max_sequence_length)

    def _prepare(self, prompts, seed, num_steps, guidance, height, width, latents,
                 negative_prompt):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        steps, g, height, width = self._settings(num_steps, guidance, height, width)
        # The negative prompt is encoded only for classifier-free guidance (g > 1).
        embeds, mask, neg, neg_mask = self.encode(prompts, negative_prompt if g > 1 else None)
        noise = self._noise(len(prompts), seed, height, width, latents)
        schedule = SanaSchedule.from_config(self.scheduler_config, steps)
        return (self.transformer, noise, schedule, embeds, mask, neg, neg_mask), g

    def sample_latents(self, prompts: str | Sequence[str], *, seed: int = 0,
                       num_steps: int | None = None, guidance: float | None = None,
                       height: int | None = None, width: int | None = None,
                       latents: jax.Array | None = None,
                       negative_prompt: str | Sequence[str] = "",
                       progress: bool = False) -> jax.Array:
        """Final latents `(b, 32, H/32, W/32)` float32, before decoding. `progress` is
        accepted for the FLUX pipeline's signature; this loop has no per-step bar."""
        args, g = self._prepare(prompts, seed, num_steps, guidance, height, width, latents,
                                negative_prompt)
        return sana_sample(*args, guidance_scale=g)

    def calibration_batches(self, prompts: Sequence[str], *, seed: int = 0,
                            num_steps: int | None = None, guidance: float | None = None,
                            height: int | None = None, width: int | None = None
                            ) -> list[dict[str, jax.Array]]:
        """The transformer's inputs along the sampling trajectory of `prompts`, one batch per
        step: with guidance, the doubled batch `[negative; prompts]` the model really sees."""
        args, g = self._prepare(prompts, seed, num_steps, guidance, height, width, None, "")
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

    def decode(self, latents: jax.Array) -> np.ndarray:
        """latents `(b, 32, h, w)` -> images `(b, 32h, 32w, 3)` in [0, 1] (VaeImageProcessor)."""
        dtype = self.vae.decoder.conv_in.kernel[...].dtype
        z = latents.astype(dtype) / jnp.asarray(self.vae.config.scaling_factor, dtype)
        image = self.vae.decode(z).astype(jnp.float32)
        return np.asarray(jnp.moveaxis(jnp.clip(image / 2 + 0.5, 0, 1), 1, -1))

    def _scheduler_settings(self) -> dict[str, Any]:
        return {"scheduler_config": self.scheduler_config}

    @staticmethod
    def _scheduler_fields(settings: dict[str, Any]) -> dict[str, Any]:
        return {"scheduler_config": settings["scheduler_config"]}


def load_sana(root: Path, dtype: Any = jnp.float32, *,
              allow_pickle: bool = False) -> SanaTextToImage:
    """A diffusers SanaPipeline folder (transformer/, text_encoder/, tokenizer/, vae/,
    scheduler/) as a JAX pipeline."""
    root = Path(root)
    sched_path = root / "scheduler" / "scheduler_config.json"
    config = read_json_object(sched_path)
    try:
        SanaSchedule.from_config(config, DEFAULT_STEPS)  # refuse a scheduler we cannot run now
    except ValueError as e:
        raise ValueError(f"{sched_path}: {e}") from e
    transformer = convert.load_transformer(root, dtype=dtype, allow_pickle=allow_pickle)
    vae = convert.load_model(root / "vae", dtype=dtype, allow_pickle=allow_pickle)
    # SanaPipeline's default size: the transformer's sample_size in latents (1024 px for 1.5).
    size = int(transformer.config.sample_size) * vae.config.spatial_compression
    return SanaTextToImage(
        transformer=transformer,
        text_encoder=convert.load_model(root / "text_encoder", dtype=dtype,
                                        allow_pickle=allow_pickle),
        tokenizer=LMTokenizer.load(root / "tokenizer"),
        vae=vae,
        scheduler_config=config,
        height=size,
        width=size,
        source=str(root),
    )
