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
from pqjax.pipelines.components import load_lm_parts, read_json_object, save_lm_parts
from pqjax.pipelines.pipeline import SamplingDefaults
from pqjax.pipelines.sana import DEFAULT_GUIDANCE, DEFAULT_STEPS, SanaSchedule, sana_sample


def _size(value: int, factor: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < factor or value % factor:
        raise ValueError(f"{what} must be a positive multiple of {factor}, got {value!r}")
    return value


# Sampling settings a checkpoint keeps (the schedule is kept beside them).
SETTINGS = ("num_steps", "guidance", "height", "width", "max_sequence_length")

@dataclasses.dataclass
class SanaTextToImage:
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
    def defaults(self) -> SamplingDefaults:
        """The sampling defaults in the FLUX pipeline's terms (what the CLI prints)."""
        return SamplingDefaults(num_inference_steps=self.num_steps, guidance_scale=self.guidance,
                                height=self.height, width=self.width,
                                latent_channels=self.transformer.config.in_channels,
                                vae_scale_factor=self.vae_scale_factor)

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.spatial_compression

    def initial_noise(self, n: int, seed: int, height: int, width: int) -> jax.Array:
        """`(n, c, H/f, W/f)` float32 noise; image i from fold_in(key(seed), i)."""
        f = self.vae_scale_factor
        shape = (self.transformer.config.in_channels, height // f, width // f)
        key = jax.random.key(seed)
        return jnp.stack([jax.random.normal(jax.random.fold_in(key, i), shape) for i in range(n)])

    def encode(self, prompts: Sequence[str],
               negative_prompt: str | Sequence[str] | None = ""):
        return sana_encode_prompt(prompts, self.text_encoder, self.tokenizer,
                                  negative_prompt=negative_prompt,
                                  max_sequence_length=self.max_sequence_length)

    def _prepare(self, prompts, seed, num_steps, guidance, height, width, latents,
                 negative_prompt):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        f = self.vae_scale_factor
        height = _size(height or self.height, f, "height")
        width = _size(width or self.width, f, "width")
        steps = self.num_steps if num_steps is None else num_steps
        g = self.guidance if guidance is None else float(guidance)
        if not np.isfinite(g):
            raise ValueError(f"guidance must be finite, got {g}")
        # The negative prompt is encoded only for classifier-free guidance (g > 1).
        embeds, mask, neg, neg_mask = self.encode(prompts, negative_prompt if g > 1 else None)
        noise = self.initial_noise(len(prompts), seed, height, width) if latents is None \
            else jnp.asarray(latents, jnp.float32)
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

    def generate(self, prompts: str | Sequence[str], **kwargs: Any) -> np.ndarray:
        """Images `(b, H, W, 3)` in [0, 1]; keywords as `sample_latents`."""
        return self.decode(self.sample_latents(prompts, **kwargs))

    def with_transformer(self, transformer: Any, quant_config: Any = None,
                         report: Any = None) -> SanaTextToImage:
        return dataclasses.replace(self, transformer=transformer, quant_config=quant_config,
                                   report=report)

    def save_parts(self, folder: Path) -> None:
        """Everything but the transformer (which `pqjax.save` writes), for `load_parts`."""
        settings = {name: getattr(self, name) for name in SETTINGS}
        save_lm_parts(folder, self.text_encoder, self.tokenizer, self.vae,
                      {**settings, "scheduler_config": self.scheduler_config})

    @classmethod
    def load_parts(cls, folder: Path, transformer: Any, **fields: Any) -> SanaTextToImage:
        """The pipeline `save_parts` wrote, around a restored `transformer`."""
        text_encoder, tokenizer, vae, settings = load_lm_parts(folder)
        return cls(transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer,
                   vae=vae, scheduler_config=settings.pop("scheduler_config"),
                   **{k: settings[k] for k in SETTINGS}, **fields)


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
