"""Z-Image-Turbo from prompt to image in JAX: Qwen3 caption features, Euler steps, the VAE.

    pipe = load_pipeline("z-image-turbo")  # a ZImagePipeline folder, HF cache entry or short name
    images = pipe.generate(["a red fox in the snow"], seed=0)    # (1, 1024, 1024, 3) in [0, 1]

As diffusers' `ZImagePipeline` at the Turbo model card's setting (8 steps, guidance 0: the
distilled model runs without classifier-free guidance; a guidance > 1 is refused, not
silently ignored): `zimage_encode_prompt` (chat template, Qwen3 `hidden_states[-2]`, 512
tokens), latents `(b, 16, H/8, W/8)`, the scheduler's shifted sigmas, `zimage_sample`,
`latents / scaling_factor + shift_factor`, VAE decode, `x / 2 + 0.5` clipped.
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
from pqjax.models.lm_prompts import ZIMAGE_MAX_SEQUENCE_LENGTH, zimage_encode_prompt
from pqjax.models.lm_tokenizer import LMTokenizer
from pqjax.models.qwen3 import Qwen3Model
from pqjax.models.vae import AutoencoderKL, latents_to_vae
from pqjax.pipelines.components import load_lm_parts, read_json_object, save_lm_parts
from pqjax.pipelines.flow import FlowMatchEuler
from pqjax.pipelines.pipeline import SamplingDefaults
from pqjax.pipelines.zimage import DEFAULT_STEPS, zimage_sample, zimage_schedule

# Sampling settings a checkpoint keeps (the schedule is kept beside them).
SETTINGS = ("num_steps", "guidance", "height", "width", "max_sequence_length")

@dataclasses.dataclass
class ZImageTextToImage:
    """Z-Image transformer + Qwen3 + the FLUX-style VAE + the flow-matching Euler scheduler."""

    transformer: Any
    text_encoder: Qwen3Model
    tokenizer: LMTokenizer
    vae: AutoencoderKL
    scheduler: FlowMatchEuler
    num_steps: int = DEFAULT_STEPS
    guidance: float = 0.0
    height: int = 1024
    width: int = 1024
    max_sequence_length: int = ZIMAGE_MAX_SEQUENCE_LENGTH
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
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def initial_noise(self, n: int, seed: int, height: int, width: int) -> jax.Array:
        """`(n, c, H/f, W/f)` float32 noise (f = 8); image i from fold_in(key(seed), i)."""
        f = self.vae_scale_factor
        shape = (self.transformer.config.in_channels, 2 * (height // (2 * f)),
                 2 * (width // (2 * f)))
        key = jax.random.key(seed)
        return jnp.stack([jax.random.normal(jax.random.fold_in(key, i), shape) for i in range(n)])

    def _prepare(self, prompts, seed, num_steps, guidance, height, width, latents):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        g = self.guidance if guidance is None else float(guidance)
        if not np.isfinite(g) or g > 1.0:
            raise ValueError(f"guidance {g}: Z-Image-Turbo samples without classifier-free "
                             "guidance (0 or 1); guided sampling is not implemented")
        f2 = 2 * self.vae_scale_factor
        height, width = height or self.height, width or self.width
        for what, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, int) or v < f2 or v % f2:
                raise ValueError(f"{what} must be a positive multiple of {f2}, got {v!r}")
        steps = self.num_steps if num_steps is None else num_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {steps!r}")
        caps, lengths = zimage_encode_prompt(prompts, self.text_encoder, self.tokenizer,
                                             max_sequence_length=self.max_sequence_length)
        # Only the real tokens matter (the pipeline hands the transformer those alone): cut the
        # all-padding columns, keeping a multiple of 32 so lengths share compiled programs.
        keep = min(caps.shape[1], -(-int(lengths.max()) // 32) * 32)
        caps = caps[:, :keep]
        noise = self.initial_noise(len(prompts), seed, height, width) if latents is None \
            else jnp.asarray(latents, jnp.float32)
        seq = (noise.shape[2] // 2) * (noise.shape[3] // 2)
        schedule = zimage_schedule(self.scheduler, steps, image_seq_len=seq)
        return self.transformer, noise, schedule, caps, jnp.asarray(lengths)

    def sample_latents(self, prompts: str | Sequence[str], *, seed: int = 0,
                       num_steps: int | None = None, guidance: float | None = None,
                       height: int | None = None, width: int | None = None,
                       latents: jax.Array | None = None,
                       progress: bool = False) -> jax.Array:
        """Final latents `(b, 16, H/8, W/8)` float32, before decoding. `progress` is accepted
        for the FLUX pipeline's signature; this loop has no per-step bar."""
        return zimage_sample(*self._prepare(prompts, seed, num_steps, guidance, height, width,
                                            latents))

    def calibration_batches(self, prompts: Sequence[str], *, seed: int = 0,
                            num_steps: int | None = None, guidance: float | None = None,
                            height: int | None = None, width: int | None = None
                            ) -> list[dict[str, jax.Array]]:
        """`forward_batch` inputs along the sampling trajectory of `prompts`, one per step."""
        args = self._prepare(prompts, seed, num_steps, guidance, height, width, None)
        _, xs = zimage_sample(*args, trajectory=True)
        caps, lengths = args[3], args[4]
        timesteps = args[2][1]
        return [dict(latents=xs[i][:, :, None].astype(caps.dtype),
                     timestep=jnp.full((xs.shape[1],), timesteps[i], jnp.float32),
                     cap_feats=caps, cap_lens=lengths) for i in range(xs.shape[0])]

    @staticmethod
    def calibration_forward(model: Any, **batch: jax.Array) -> jax.Array:
        """How `calibrate` runs the transformer on one of `calibration_batches`."""
        return model.forward_batch(**batch)

    def decode(self, latents: jax.Array) -> np.ndarray:
        """latents `(b, 16, h, w)` -> images `(b, 8h, 8w, 3)` in [0, 1] (VaeImageProcessor)."""
        dtype = self.vae.decoder.conv_in.kernel[...].dtype
        image = self.vae.decode(latents_to_vae(latents, self.vae.config).astype(dtype))
        image = jnp.clip(image.astype(jnp.float32) / 2 + 0.5, 0, 1)
        return np.asarray(jnp.moveaxis(image, 1, -1))

    def generate(self, prompts: str | Sequence[str], **kwargs: Any) -> np.ndarray:
        """Images `(b, H, W, 3)` in [0, 1]; keywords as `sample_latents`."""
        return self.decode(self.sample_latents(prompts, **kwargs))

    def with_transformer(self, transformer: Any, quant_config: Any = None,
                         report: Any = None) -> ZImageTextToImage:
        return dataclasses.replace(self, transformer=transformer, quant_config=quant_config,
                                   report=report)

    def save_parts(self, folder: Path) -> None:
        """Everything but the transformer (which `pqjax.save` writes), for `load_parts`."""
        settings = {name: getattr(self, name) for name in SETTINGS}
        save_lm_parts(folder, self.text_encoder, self.tokenizer, self.vae,
                      {**settings, "scheduler": dataclasses.asdict(self.scheduler)})

    @classmethod
    def load_parts(cls, folder: Path, transformer: Any, **fields: Any) -> ZImageTextToImage:
        """The pipeline `save_parts` wrote, around a restored `transformer`."""
        text_encoder, tokenizer, vae, settings = load_lm_parts(folder)
        return cls(transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer,
                   vae=vae, scheduler=FlowMatchEuler(**settings.pop("scheduler")),
                   **{k: settings[k] for k in SETTINGS}, **fields)


def load_zimage(root: Path, dtype: Any = jnp.float32, *,
                allow_pickle: bool = False) -> ZImageTextToImage:
    """A diffusers ZImagePipeline folder (transformer/, text_encoder/, tokenizer/, vae/,
    scheduler/) as a JAX pipeline."""
    root = Path(root)
    sched_path = root / "scheduler" / "scheduler_config.json"
    return ZImageTextToImage(
        transformer=convert.load_transformer(root, dtype=dtype, allow_pickle=allow_pickle),
        text_encoder=convert.load_model(root / "text_encoder", dtype=dtype,
                                        allow_pickle=allow_pickle),
        tokenizer=LMTokenizer.load(root / "tokenizer"),
        vae=convert.load_model(root / "vae", dtype=dtype, allow_pickle=allow_pickle),
        scheduler=FlowMatchEuler.from_config(read_json_object(sched_path), str(sched_path)),
        source=str(root),
    )
