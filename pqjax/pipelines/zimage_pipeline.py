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
from pqjax.pipelines.components import read_json_object
from pqjax.pipelines.flow import FlowMatchEuler
from pqjax.pipelines.lm_pipeline import LMTextToImage
from pqjax.pipelines.zimage import DEFAULT_STEPS, zimage_sample, zimage_schedule


@dataclasses.dataclass
class ZImageTextToImage(LMTextToImage):
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
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        return 2 * self.vae_scale_factor  # 2x2 patches of latents

    def _prepare(self, prompts, seed, num_steps, guidance, height, width, latents):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        steps, g, height, width = self._settings(num_steps, guidance, height, width)
        if g > 1.0:
            raise ValueError(f"guidance {g}: Z-Image-Turbo samples without classifier-free "
                             "guidance (0 or 1); guided sampling is not implemented")
        caps, lengths = zimage_encode_prompt(prompts, self.text_encoder, self.tokenizer,
                                             max_sequence_length=self.max_sequence_length)
        # Only the real tokens matter (the pipeline hands the transformer those alone): cut the
        # all-padding columns, keeping a multiple of 32 so lengths share compiled programs.
        keep = min(caps.shape[1], -(-int(lengths.max()) // 32) * 32)
        caps = caps[:, :keep]
        noise = self._noise(len(prompts), seed, height, width, latents)
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

    def _scheduler_settings(self) -> dict[str, Any]:
        return {"scheduler": dataclasses.asdict(self.scheduler)}

    @staticmethod
    def _scheduler_fields(settings: dict[str, Any]) -> dict[str, Any]:
        return {"scheduler": FlowMatchEuler(**settings["scheduler"])}


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
