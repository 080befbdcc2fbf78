"""Z-Image-Turbo from prompt to image in JAX: Qwen3 caption features, Euler steps, the VAE.

    pipe = load_pipeline("z-image-turbo")  # a ZImagePipeline folder, HF cache entry or short name
    images = pipe.generate(["a red fox in the snow"], seed=0)    # (1, 1024, 1024, 3) in [0, 1]

As diffusers' `ZImagePipeline`, with the Turbo model card's defaults (8 steps, guidance 0: the
distilled model runs without classifier-free guidance): `zimage_encode_prompt` (chat template,
Qwen3 `hidden_states[-2]`, 512 tokens), latents `(b, 16, H/8, W/8)`, the scheduler's shifted
sigmas, `zimage_sample`, `latents / scaling_factor + shift_factor`, VAE decode, `x / 2 + 0.5`
clipped. A guidance above 0 turns on classifier-free guidance as the pipeline does it (its
`pos + g (pos - neg)`, so 1 is already guided): negative prompts "" unless given, and the
options `cfg_truncation` and `cfg_normalization` (`pqjax.pipelines.zimage`).
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
from pqjax.pipelines.components import OnDemand, encoders_on_demand, held, read_json_object
from pqjax.pipelines.flow import FlowMatchEuler
from pqjax.pipelines.lm_pipeline import LMTextToImage
from pqjax.pipelines.zimage import (
    DEFAULT_STEPS,
    guidance_per_step,
    join_captions,
    zimage_sample,
    zimage_schedule,
)


@dataclasses.dataclass
class ZImageTextToImage(LMTextToImage):
    """Z-Image transformer + Qwen3 + the FLUX-style VAE + the flow-matching Euler scheduler."""

    transformer: Any
    text_encoder: Qwen3Model | OnDemand
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
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        return 2 * self.vae_scale_factor  # 2x2 patches of latents

    def _captions(self, prompts: list[str], qwen: Qwen3Model) -> tuple[jax.Array, jax.Array]:
        caps, lengths = zimage_encode_prompt(prompts, qwen, self.tokenizer,
                                             max_sequence_length=self.max_sequence_length)
        # Only the real tokens matter (the pipeline hands the transformer those alone): cut the
        # all-padding columns, keeping a multiple of 32 so lengths share compiled programs.
        keep = min(caps.shape[1], -(-int(lengths.max()) // 32) * 32)
        return caps[:, :keep], jnp.asarray(lengths)

    def _prepare(self, prompts, seed, num_steps, guidance, height, width, latents,
                 negative_prompt=None, cfg_truncation=1.0, cfg_normalization=0.0):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        steps, g, height, width = self._settings(num_steps, guidance, height, width)
        for what, v in (("cfg_truncation", cfg_truncation),
                        ("cfg_normalization", cfg_normalization)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)
                                  or not np.isfinite(v) or v < 0):
                raise ValueError(f"{what} must be a finite number >= 0, got {v!r}")
        negatives = None
        if g > 0:  # ZImagePipeline guides wherever guidance_scale > 0
            negatives = [""] * len(prompts) if negative_prompt is None else (
                [negative_prompt] * len(prompts) if isinstance(negative_prompt, str)
                else list(negative_prompt))
            if len(negatives) != len(prompts):
                raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        noise = self._noise(len(prompts), seed, height, width, latents)  # checked first
        qwen = held(self.text_encoder)  # loaded here if on demand, released on return
        caps, lengths = self._captions(prompts, qwen)
        seq = (noise.shape[2] // 2) * (noise.shape[3] // 2)
        schedule = zimage_schedule(self.scheduler, steps, image_seq_len=seq)
        guide = dict(guidance=g, cfg_truncation=cfg_truncation,
                     cfg_normalization=float(cfg_normalization or 0.0),
                     negative=None if negatives is None else self._captions(negatives, qwen))
        return (self.transformer, noise, schedule, caps, lengths), guide

    def sample_latents(self, prompts: str | Sequence[str], *, seed: int = 0,
                       num_steps: int | None = None, guidance: float | None = None,
                       height: int | None = None, width: int | None = None,
                       latents: jax.Array | None = None,
                       negative_prompt: str | Sequence[str] | None = None,
                       cfg_truncation: float | None = 1.0, cfg_normalization: float = 0.0,
                       progress: bool = False) -> jax.Array:
        """Final latents `(b, 16, H/8, W/8)` float32, before decoding. `progress` is accepted
        for the FLUX pipeline's signature; this loop has no per-step bar."""
        args, guide = self._prepare(prompts, seed, num_steps, guidance, height, width, latents,
                                    negative_prompt, cfg_truncation, cfg_normalization)
        return zimage_sample(*args, **guide)

    def calibration_batches(self, prompts: Sequence[str], *, seed: int = 0,
                            num_steps: int | None = None, guidance: float | None = None,
                            height: int | None = None, width: int | None = None
                            ) -> list[dict[str, jax.Array]]:
        """`forward_batch` inputs along the sampling trajectory of `prompts`, one per step:
        with guidance, the batch `[prompts; negatives]` the model sees at the guided steps."""
        args, guide = self._prepare(prompts, seed, num_steps, guidance, height, width, None)
        _, xs = zimage_sample(*args, trajectory=True, **guide)
        caps, lengths = args[3], args[4]
        timesteps = args[2][1]
        scales = np.zeros(len(timesteps), np.float32)
        if guide["negative"] is not None:
            scales = guidance_per_step(timesteps, guide["guidance"], guide["cfg_truncation"])
            both = join_captions((caps, lengths), guide["negative"])
        batches = []
        for i in range(xs.shape[0]):
            x, c, n = xs[i], caps, lengths
            if scales[i] > 0:
                x, (c, n) = jnp.concatenate([x, x]), both
            batches.append(dict(latents=x[:, :, None].astype(c.dtype),
                                timestep=jnp.full((x.shape[0],), timesteps[i], jnp.float32),
                                cap_feats=c, cap_lens=n))
        return batches

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

    def _scheduler_settings(self) -> dict[str, Any]:
        return {"scheduler": dataclasses.asdict(self.scheduler)}

    @staticmethod
    def _scheduler_fields(settings: dict[str, Any]) -> dict[str, Any]:
        return {"scheduler": FlowMatchEuler(**settings["scheduler"])}


def load_zimage(root: Path, dtype: Any = None, *, allow_pickle: bool = False,
                max_memory: Any = None, transformer: Any = None) -> ZImageTextToImage:
    """A diffusers ZImagePipeline folder (transformer/, text_encoder/, tokenizer/, vae/,
    scheduler/) as a JAX pipeline. max_memory: where all weights in `dtype` exceed it, Qwen3
    stays on disk until each encoding (`OnDemand`). transformer: use this one instead of
    loading it (e.g. a `pqjax.engine.streamed.StreamedModel`)."""
    root = Path(root)
    on_demand = encoders_on_demand(root, ("text_encoder",), ("transformer", "vae"), dtype=dtype,
                                   allow_pickle=allow_pickle, max_memory=max_memory)
    sched_path = root / "scheduler" / "scheduler_config.json"
    return ZImageTextToImage(
        transformer=transformer if transformer is not None
        else convert.load_transformer(root, dtype=dtype, allow_pickle=allow_pickle),
        text_encoder=OnDemand(root / "text_encoder", dtype, allow_pickle) if on_demand
        else convert.load_model(root / "text_encoder", dtype=dtype, allow_pickle=allow_pickle),
        tokenizer=LMTokenizer.load(root / "tokenizer"),
        vae=convert.load_model(root / "vae", dtype=dtype, allow_pickle=allow_pickle),
        scheduler=FlowMatchEuler.from_config(read_json_object(sched_path), str(sched_path)),
        source=str(root),
    )
