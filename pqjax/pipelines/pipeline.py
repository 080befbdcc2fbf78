"""A FLUX-style text-to-image pipeline around a (quantized) transformer, sampled in one jit.

    pipe = Pipeline(transformer, text_encoder, scheduler, decoder, defaults)
    images = pipe.generate(["a handwritten digit 3", "a handwritten digit 7"], seed=0)

Image i's starting noise is drawn from `fold_in(seed_key(seed), i)`, so an image depends on its seed
and index, not on what else is in the batch. The whole sampling loop is one jitted function of
(graphdef, state, inputs): it compiles once per shape, not once per step.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pqjax.pipelines.components import for_sampling
from pqjax.pipelines.flow import (
    FlowMatchEuler,
    StepProgress,
    euler_sample,
    euler_step,
    latent_image_ids,
    pack_latents,
    unpack_latents,
)


class TextEncoder(Protocol):
    def encode(self, prompts: Sequence[str]) -> tuple[jax.Array, jax.Array, jax.Array]:
        """prompts -> (prompt_embeds (b, T, D), pooled (b, P), txt_ids (T, 3))."""
        ...


class Decoder(Protocol):
    def decode(self, latents: jax.Array) -> jax.Array:
        """latents (b, c, h, w) -> images (b, H, W) or (b, H, W, 3) in [0, 1]."""
        ...


@dataclasses.dataclass(frozen=True)
class IdentityDecoder:
    """Pixel-space models: latents in [-1, 1] are the image (1 channel: grayscale)."""

    def decode(self, latents: jax.Array) -> jax.Array:
        img = jnp.clip((latents.astype(jnp.float32) + 1) / 2, 0, 1)
        return img[:, 0] if img.shape[1] == 1 else jnp.moveaxis(img, 1, -1)

    def save(self, folder: Any) -> None:
        """Nothing to store."""

    @classmethod
    def load(cls, folder: Any, dtype: Any = None) -> IdentityDecoder:
        return cls()


@dataclasses.dataclass(frozen=True)
class SamplingDefaults:
    num_inference_steps: int = 28
    guidance_scale: float = 3.5
    height: int = 1024
    width: int = 1024
    latent_channels: int = 16
    vae_scale_factor: int = 8

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SamplingDefaults:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


def seed_key(seed: int) -> jax.Array:
    """The PRNG key of a non-negative integer seed of any size.

    jax keys hold 32 bits: seeds below 2**32 give `key(seed)` itself; the higher 32-bit words
    of a larger seed are folded in one after another, so no two seeds share a key by truncation.
    """
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    key = jax.random.key(seed & 0xFFFFFFFF)
    seed >>= 32
    while seed:
        key = jax.random.fold_in(key, seed & 0xFFFFFFFF)
        seed >>= 32
    return key


def check_sampling(num_steps: Any, guidance: Any) -> None:
    """Refuse a step count below 1 and a guidance that is not a finite number >= 0."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int | np.integer) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    try:
        g = float(guidance)
    except (TypeError, ValueError):
        g = float("nan")
    if isinstance(guidance, bool) or not np.isfinite(g) or g < 0:
        raise ValueError(f"guidance must be a finite number >= 0, got {guidance!r}")


def _velocity(model: Any, embeds, pooled, txt_ids, img_ids, guidance):
    def velocity(x, t):
        return model(
            hidden_states=x,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            timestep=t,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=guidance,
        )

    return velocity


@functools.partial(jax.jit, static_argnames=("graphdef", "trajectory", "progress"))
def _sample(
    graphdef,
    state,
    x,
    embeds,
    pooled,
    txt_ids,
    img_ids,
    guidance,
    sigmas,
    timesteps,
    trajectory=False,
    progress=False,
):
    velocity = _velocity(nnx.merge(graphdef, state), embeds, pooled, txt_ids, img_ids, guidance)
    if not trajectory:
        return euler_sample(velocity, x, sigmas, timesteps, progress=progress)

    def step(x, i):  # also returns the transformer's input at every step (calibration data)
        return euler_step(velocity, x, sigmas, timesteps, i), x

    final, xs = jax.lax.scan(step, x, jnp.arange(timesteps.shape[0]))
    return final, xs


def sample(model: Any, *args: Any, trajectory: bool = False, progress: bool = False) -> Any:
    """`_sample` of `model`: in one jit, or step by step for a model that runs eagerly
    (`pqjax.engine.streamed.StreamedModel`, one block in memory at a time). A model kept on
    disk loads here, after the prompts were encoded (`for_sampling`)."""
    model = for_sampling(model)
    if not getattr(model, "eager", False):
        graphdef, state = nnx.split(model)
        return _sample(graphdef, state, *args, trajectory=trajectory, progress=progress)
    x, embeds, pooled, txt_ids, img_ids, guidance, sigmas, timesteps = args
    velocity = _velocity(model, embeds, pooled, txt_ids, img_ids, guidance)
    xs = []
    for i in range(timesteps.shape[0]):
        xs.append(x)
        x = euler_step(velocity, x, sigmas, timesteps, i)
    return (x, jnp.stack(xs)) if trajectory else x


@dataclasses.dataclass
class Pipeline:
    """Transformer + text encoder + scheduler + decoder, with sampling defaults."""

    transformer: nnx.Module
    text_encoder: TextEncoder
    scheduler: FlowMatchEuler
    decoder: Decoder
    defaults: SamplingDefaults
    source: str = ""
    quant_config: Any = None  # pqjax.QuantConfig of the transformer, None if full precision
    report: Any = None  # pqjax.QuantReport of the quantization, if any

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.defaults.vae_scale_factor
        h, w = 2 * (height // (f * 2)), 2 * (width // (f * 2))
        if h == 0 or w == 0:
            raise ValueError(f"image size {height}x{width} is below one 2x2 latent patch")
        return self.defaults.latent_channels, h, w

    def initial_noise(self, n: int, seed: int, height: int, width: int) -> jax.Array:
        """`(n, c, h, w)` float32 noise; image i from fold_in(seed_key(seed), i)."""
        shape = self.latent_shape(height, width)
        key = seed_key(seed)
        return jnp.stack([jax.random.normal(jax.random.fold_in(key, i), shape) for i in range(n)])

    def _inputs(self, prompts, seed, num_steps, guidance, height, width, latents):
        d = self.defaults
        height, width = height or d.height, width or d.width
        steps = d.num_inference_steps if num_steps is None else num_steps
        g = d.guidance_scale if guidance is None else guidance
        check_sampling(steps, g)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("generate: no prompts given")
        embeds, pooled, txt_ids = self.text_encoder.encode(prompts)
        noise = (
            self.initial_noise(len(prompts), seed, height, width) if latents is None else latents
        )
        _, h, w = noise.shape[1:]
        x = pack_latents(noise)
        sigmas = self.scheduler.sigmas(steps, image_seq_len=x.shape[1])
        gvec = (
            jnp.full((len(prompts),), g, jnp.float32)
            if self.transformer.config.guidance_embeds
            else None
        )
        args = (
            x,
            embeds,
            pooled,
            txt_ids,
            latent_image_ids(h, w),
            gvec,
            jnp.asarray(sigmas),
            jnp.asarray(self.scheduler.model_timesteps(sigmas)),
        )
        return args, (h, w)

    def sample_latents(
        self,
        prompts: str | Sequence[str],
        *,
        seed: int = 0,
        num_steps: int | None = None,
        guidance: float | None = None,
        height: int | None = None,
        width: int | None = None,
        latents: jax.Array | None = None,
        progress: bool = False,
    ) -> jax.Array:
        """Final latents `(b, c, h, w)` (before decoding); progress: a tqdm bar over steps."""
        args, (h, w) = self._inputs(prompts, seed, num_steps, guidance, height, width, latents)
        if not progress:
            return unpack_latents(sample(self.transformer, *args), h, w)
        from tqdm.auto import tqdm

        with tqdm(total=int(args[-1].shape[0]), desc="sample", unit="step") as bar:
            StepProgress.bar = bar
            try:
                packed = jax.block_until_ready(sample(self.transformer, *args, progress=True))
            finally:
                StepProgress.bar = None
        return unpack_latents(packed, h, w)

    def generate(self, prompts: str | Sequence[str], **kwargs: Any) -> np.ndarray:
        """Images in [0, 1]: `(b, H, W)` grayscale or `(b, H, W, 3)`; see `sample_latents`."""
        return np.asarray(self.decoder.decode(self.sample_latents(prompts, **kwargs)))

    def calibration_batches(
        self,
        prompts: Sequence[str],
        *,
        seed: int = 0,
        num_steps: int | None = None,
        guidance: float | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> list[dict[str, jax.Array]]:
        """Transformer inputs along the sampling trajectory of `prompts`: one batch per step.

        This is the calibration data of the paper: prompts' embeddings x timesteps of the
        schedule, with the latents the full-precision model itself produces.
        """
        args, _ = self._inputs(prompts, seed, num_steps, guidance, height, width, None)
        x, embeds, pooled, txt_ids, img_ids, gvec, _sigmas, timesteps = args
        _, xs = sample(self.transformer, *args, trajectory=True)
        batches = []
        for i in range(xs.shape[0]):
            batch = dict(
                hidden_states=xs[i],
                encoder_hidden_states=embeds,
                pooled_projections=pooled,
                timestep=jnp.full((x.shape[0],), timesteps[i], x.dtype),
                img_ids=img_ids,
                txt_ids=txt_ids,
            )
            if gvec is not None:
                batch["guidance"] = gvec
            batches.append(batch)
        return batches

    def with_transformer(
        self, transformer: nnx.Module, quant_config: Any = None, report: Any = None
    ) -> Pipeline:
        return dataclasses.replace(
            self, transformer=transformer, quant_config=quant_config, report=report
        )
