"""What SANA's and Z-Image's pipelines share: defaults, starting noise, argument checks,
generate, and the parts a checkpoint keeps besides the transformer.

A subclass is a dataclass with the fields `transformer`, `text_encoder`, `tokenizer`, `vae`,
`num_steps`, `guidance`, `height`, `width`, `max_sequence_length`, `quant_config`, `report`,
and provides `vae_scale_factor`, `size_multiple`, `sample_latents`, `decode`, and the two
scheduler hooks `_scheduler_settings` / `_scheduler_fields`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pqjax.pipelines.components import held, load_lm_parts, save_lm_parts
from pqjax.pipelines.pipeline import SamplingDefaults, check_sampling, seed_key

# Sampling settings a checkpoint keeps (the schedule is kept beside them).
SETTINGS = ("num_steps", "guidance", "height", "width", "max_sequence_length")


class LMTextToImage:
    """Mixin of the decoder-LM text-to-image pipelines (see the module docstring)."""

    @property
    def defaults(self) -> SamplingDefaults:
        """The sampling defaults in the FLUX pipeline's terms (what the CLI prints)."""
        return SamplingDefaults(num_inference_steps=self.num_steps, guidance_scale=self.guidance,
                                height=self.height, width=self.width,
                                latent_channels=self.transformer.config.in_channels,
                                vae_scale_factor=self.vae_scale_factor)

    def initial_noise(self, n: int, seed: int, height: int, width: int) -> jax.Array:
        """`(n, c, H/f, W/f)` float32 noise; image i from fold_in(seed_key(seed), i), as the
        FLUX pipeline draws it (any non-negative seed)."""
        f = self.vae_scale_factor
        shape = (self.transformer.config.in_channels, height // f, width // f)
        key = seed_key(seed)
        return jnp.stack([jax.random.normal(jax.random.fold_in(key, i), shape) for i in range(n)])

    def _settings(self, num_steps: Any, guidance: Any, height: Any, width: Any
                  ) -> tuple[int, float, int, int]:
        """(steps, guidance, height, width) with the pipeline's defaults filled in, checked
        before any work: steps >= 1, a finite guidance >= 0, sizes multiples of
        `size_multiple`."""
        steps = self.num_steps if num_steps is None else num_steps
        g = self.guidance if guidance is None else guidance
        check_sampling(steps, g)
        m = self.size_multiple
        height, width = height or self.height, width or self.width
        for what, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, int) or v < m or v % m:
                raise ValueError(f"{what} must be a positive multiple of {m}, got {v!r}")
        return int(steps), float(g), height, width

    def _noise(self, n: int, seed: int, height: int, width: int, latents: Any) -> jax.Array:
        """The starting latents: drawn from the seed, or the given ones, which must have the
        shape of the sampled size (not silently another size)."""
        if latents is None:
            return self.initial_noise(n, seed, height, width)
        f = self.vae_scale_factor
        want = (n, self.transformer.config.in_channels, height // f, width // f)
        if tuple(np.shape(latents)) != want:
            raise ValueError(f"latents of shape {tuple(np.shape(latents))} given; sampling "
                             f"{n} image(s) of {height}x{width} needs {want}")
        return jnp.asarray(latents, jnp.float32)

    def generate(self, prompts: str | Sequence[str], **kwargs: Any) -> np.ndarray:
        """Images `(b, H, W, 3)` in [0, 1]; keywords as `sample_latents`."""
        return self.decode(self.sample_latents(prompts, **kwargs))

    def with_transformer(self, transformer: Any, quant_config: Any = None,
                         report: Any = None) -> Any:
        return dataclasses.replace(self, transformer=transformer, quant_config=quant_config,
                                   report=report)

    def save_parts(self, folder: Path) -> None:
        """Everything but the transformer (which `pqjax.save` writes), for `load_parts`."""
        settings = {name: getattr(self, name) for name in SETTINGS}
        save_lm_parts(folder, held(self.text_encoder), self.tokenizer, self.vae,
                      {**settings, **self._scheduler_settings()})

    @classmethod
    def load_parts(cls, folder: Path, transformer: Any, *, max_memory: Any = None,
                   **fields: Any) -> Any:
        """The pipeline `save_parts` wrote, around a restored `transformer`; the text encoder
        stays on disk (`OnDemand`) where all weights exceed `max_memory`."""
        text_encoder, tokenizer, vae, settings = load_lm_parts(folder, transformer, max_memory)
        return cls(transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer,
                   vae=vae, **cls._scheduler_fields(settings),
                   **{k: settings[k] for k in SETTINGS}, **fields)
