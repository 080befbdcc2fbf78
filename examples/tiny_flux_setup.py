"""What the tiny FLUX digits run is made of: its config, model, data, noise levels, sampler.

Shared by `examples/train_tiny_flux.py` (training) and `examples/tiny_flux_eval.py`
(tuning, evaluation, export). Nothing here trains.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pqjax.eval.digits import load_digits16
from pqjax.models.flux import FluxConfig, FluxTransformer2DModel
from pqjax.models.text_table import PromptTable
from pqjax.pipelines.flow import FlowMatchEuler, latent_image_ids, pack_latents, unpack_latents

SIZE = 16  # pixels per side; the "latent" is the image (identity autoencoder, 1 channel)
N_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the result. `QUICK` is a smoke test of the whole path."""

    seed: int = 0
    # model: hidden 128 = 2 heads × 64; RoPE (8, 28, 28) is FLUX's (16, 56, 56) halved
    num_layers: int = 2
    num_single_layers: int = 2
    num_attention_heads: int = 2
    attention_head_dim: int = 64
    axes_dims_rope: tuple[int, int, int] = (8, 28, 28)
    joint_attention_dim: int = 64
    pooled_projection_dim: int = 32
    text_tokens: int = 6  # learned tokens per prompt (not a power of two on purpose)
    # data / objective
    batch: int = 64
    logit_std: float = 1.0  # sigma = shift(sigmoid(N(0, logit_std^2))), FLUX's shift for 64 tokens
    p_uncond: float = 0.1  # label dropout to the null prompt (teacher); null rows (student)
    # phase 1: CFG-capable teacher, guidance input fixed at teacher_guidance
    teacher_steps: int = 800
    teacher_lr: float = 1e-3
    teacher_guidance: float = 1.0
    # phase 2: guidance distillation into the student
    distill_steps: int = 250
    distill_lr: float = 3e-4
    guidance_range: tuple[float, float] = (1.0, 5.0)
    warmup: int = 100
    weight_decay: float = 1e-4
    clip_norm: float = 1.0
    ckpt_every: int = 200
    # tuning and evaluation of the student's samples
    tune_steps: tuple[int, ...] = (8, 16, 28)
    tune_guidance: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 4.0, 5.0)
    tune_per_digit: int = 10
    eval_per_digit: int = 20
    run_dir: str = "runs/tiny_flux"
    asset_dir: str = "pqjax/assets/tiny-flux-digits"

    def flux_config(self) -> FluxConfig:
        return FluxConfig(
            in_channels=4,  # 1 channel packed 2×2
            num_layers=self.num_layers,
            num_single_layers=self.num_single_layers,
            attention_head_dim=self.attention_head_dim,
            num_attention_heads=self.num_attention_heads,
            joint_attention_dim=self.joint_attention_dim,
            pooled_projection_dim=self.pooled_projection_dim,
            guidance_embeds=True,
            axes_dims_rope=self.axes_dims_rope,
        )


QUICK = TrainConfig(
    teacher_steps=12, distill_steps=6, batch=16, warmup=4, ckpt_every=5,
    tune_steps=(4,), tune_guidance=(1.0, 3.0), tune_per_digit=2, eval_per_digit=2,
    run_dir="runs/tiny_flux_quick", asset_dir="runs/tiny_flux_quick/asset",
)


class Bundle(nnx.Module):
    """The trained pair: the FLUX transformer and its prompt table ("text encoder")."""

    def __init__(self, cfg: TrainConfig, rngs: nnx.Rngs):
        self.transformer = FluxTransformer2DModel(cfg.flux_config(), rngs=rngs)
        self.text_encoder = PromptTable(
            N_CLASSES, cfg.text_tokens, cfg.joint_attention_dim, cfg.pooled_projection_dim,
            rngs=rngs,
        )
        zero_init_modulation(self.transformer)


def zero_init_modulation(model: FluxTransformer2DModel) -> None:
    """DiT's adaLN-Zero start: every modulation and the output projection at 0.

    Gates start at 0, so each block starts as the identity and the model outputs 0; training
    from scratch is then stable at a high learning rate.
    """
    linears = [model.norm_out.linear, model.proj_out]
    for block in model.transformer_blocks:
        linears += [block.norm1.linear, block.norm1_context.linear]
    for block in model.single_transformer_blocks:
        linears.append(block.norm.linear)
    for lin in linears:
        lin.kernel[...] = jnp.zeros_like(lin.kernel[...])
        lin.bias[...] = jnp.zeros_like(lin.bias[...])


def packed_digits() -> tuple[jax.Array, jax.Array]:
    """The training set: x0 `(1797, 64, 4)` float32 in [-1, 1] (FLUX-packed), labels `(1797,)`."""
    images, labels = load_digits16()
    x = jnp.asarray(images * 2.0 - 1.0)[:, None]  # (n, 1, 16, 16), channels first like a VAE
    return pack_latents(x), jnp.asarray(labels, jnp.int32)


def to_images(packed: jax.Array) -> np.ndarray:
    """Model space `(b, 64, 4)` -> images `(b, 16, 16)` float32 in [0, 1] (clipped)."""
    x = unpack_latents(packed, SIZE, SIZE)[:, 0]
    return np.clip((np.asarray(x, np.float32) + 1.0) / 2.0, 0.0, 1.0)


def scheduler() -> FlowMatchEuler:
    """FLUX.1-dev's scheduler settings (dynamic shifting by image size), used as is."""
    return FlowMatchEuler()


def sample_sigmas(key: jax.Array, n: int, logit_std: float) -> jax.Array:
    """Training noise levels `(n,)`: FLUX's shifted logit-normal.

    sigmoid(N(0, std^2)), then the same time shift the sampler applies at this size
    (mu = scheduler().mu(64 tokens) ≈ 0.47, i.e. exp(mu) ≈ 1.6), so training puts its
    effort where sampling spends its steps.
    """
    s = jax.nn.sigmoid(logit_std * jax.random.normal(key, (n,)))
    e = np.float32(np.exp(scheduler().mu((SIZE // 2) ** 2)))
    return e * s / (e * s + (1.0 - s))


def img_ids() -> jax.Array:
    return latent_image_ids(SIZE, SIZE)


def txt_ids(tokens: int) -> jax.Array:
    return jnp.zeros((tokens, 3), jnp.float32)


def velocity(model: FluxTransformer2DModel, x: jax.Array, embeds: jax.Array, pooled: jax.Array,
             t: jax.Array, guidance: jax.Array) -> jax.Array:
    """One FLUX forward: x `(b, 64, 4)`, embeds `(b, T, joint)`, pooled `(b, P)`, t, g `(b,)`."""
    return model(hidden_states=x, encoder_hidden_states=embeds, pooled_projections=pooled,
                 timestep=t, img_ids=img_ids(), txt_ids=txt_ids(embeds.shape[1]),
                 guidance=guidance)


@functools.partial(jax.jit, static_argnums=0)
def _sample(graphdef: Any, state: Any, noise: jax.Array, embeds: jax.Array, pooled: jax.Array,
            sigmas: jax.Array, timesteps: jax.Array, guidance: jax.Array) -> jax.Array:
    from pqjax.pipelines.flow import euler_sample

    model = nnx.merge(graphdef, state)
    x = pack_latents(noise)
    g = jnp.full((x.shape[0],), guidance, jnp.float32)
    return euler_sample(lambda x, t: velocity(model, x, embeds, pooled, t, g), x, sigmas,
                        timesteps)


def sample(model: FluxTransformer2DModel, table: PromptTable, rows: np.ndarray, seed: int,
           steps: int, guidance: float) -> np.ndarray:
    """FluxPipeline's loop: noise `(b, 1, 16, 16)` (image i from `fold_in(key(seed), i)`, as
    `pqjax.pipelines` draws it), packed, `steps` Euler steps with `guidance` fed to the
    guidance embedding (one forward per step). rows `(b,)` prompt rows.
    Returns images `(b, 16, 16)` in [0, 1]."""
    sched = scheduler()
    sigmas = sched.sigmas(steps, image_seq_len=(SIZE // 2) ** 2)
    embeds, pooled = table(jnp.asarray(rows, jnp.int32))
    key = jax.random.key(seed)
    noise = jnp.stack([jax.random.normal(jax.random.fold_in(key, i), (1, SIZE, SIZE))
                       for i in range(len(rows))])
    graphdef, state = nnx.split(model)
    out = _sample(graphdef, state, noise, embeds, pooled, jnp.asarray(sigmas),
                  jnp.asarray(sched.model_timesteps(sigmas)), jnp.float32(guidance))
    return to_images(out)


class Flat:
    """An nnx.State <-> `{path: array}` with string keys (what orbax stores plainly)."""

    def __init__(self, state: Any):
        leaves, self.treedef = jax.tree_util.tree_flatten_with_path(state)
        self.keys = [".".join(_name(k) for k in path) for path, _ in leaves]

    def flatten(self, state: Any) -> dict[str, jax.Array]:
        return dict(zip(self.keys, jax.tree_util.tree_leaves(state), strict=True))

    def unflatten(self, flat: dict[str, jax.Array]) -> Any:
        return jax.tree_util.tree_unflatten(self.treedef, [flat[k] for k in self.keys])


def _name(entry: Any) -> str:
    """One path entry as plain text: dict key, list index or attribute name."""
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def param_count(module: nnx.Module) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(module, nnx.Param))))
