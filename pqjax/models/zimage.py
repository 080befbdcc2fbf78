"""Z-Image transformer (diffusers `ZImageTransformer2DModel`, basic mode) in Flax NNX.

A single-stream DiT: image tokens go through `noise_refiner` (AdaLN-modulated blocks), caption
tokens through `context_refiner` (unmodulated blocks), then the concatenated `[image; caption]`
sequence through `layers` and the final layer. 3-axis RoPE, per-head q/k RMSNorm, SwiGLU FFN,
sandwich RMSNorms. Every image and caption is padded to a multiple of 32 tokens with learned
pad tokens (`x_pad_token`, `cap_pad_token`) that are attended to like real tokens.

Three entry points, one computation (`forward_tokens`):

    out = model(x=[lat (C, F, H, W), ...], t=t, cap_feats=[(L_i, cap_dim), ...])  # diffusers
    out = model.forward_batch(latents (B, C, F, H, W), t, cap_feats (B, L, cap_dim), cap_lens)
    out = model.forward_tokens(x_tokens, x_ids, x_lens, cap_feats, cap_lens, t)   # the core

`__call__` keeps diffusers' list semantics and return value (a list of `(C, F, H, W)` arrays,
diffusers' `.sample`), with images of different sizes and captions of different lengths.
`forward_batch` is the fixed-shape, jit-friendly one for sampling: one latent size per batch,
captions right-padded in a `(B, L, cap_dim)` buffer with their lengths `cap_lens` as an array.
Padding to batch shapes only adds masked keys, so the results equal diffusers' up to float
summation order.

Positions (diffusers `patchify_and_embed`): caption token j sits at (1 + j, 0, 0), pad tokens
included; with `P = round_up(L, 32)` the caption's padded length, image token (f, h, w) sits at
(P + 1 + f, h, w) and image pad tokens at (0, 0, 0). The image comes first in the sequence.

Sampling convention (diffusers 0.42.1 `ZImagePipeline`; the sampler lives elsewhere):
- flow matching, Euler (`FlowMatchEulerDiscreteScheduler`), 8 steps for Turbo, no CFG
  (guidance_scale=0). sigmas = linspace(1, 1/8, 8), then shifted by the scheduler config
  (static: s -> shift*s / (1 + (shift-1)*s); Turbo's scheduler_config is believed to be
  shift=3.0, use_dynamic_shifting=false, unverified offline; with dynamic shifting the pipeline
  passes mu = calculate_shift((H/2)*(W/2) tokens, 256, 4096, 0.5, 1.15)); a final sigma 0 is
  appended. The scheduler's timesteps are t_i = 1000 * sigma_i.
- The transformer receives `timestep = (1000 - t_i) / 1000 = 1 - sigma_i`, float32, shape (B,):
  0 for pure noise, rising towards 1 (clean). It multiplies by `t_scale` (1000) internally.
- The output v is negated (`noise_pred = -v`) and stepped:
  x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * (-v), i.e. v points from noise towards the image.
  Latents are float32 `(B, 16, H/8, W/8)` from N(0, 1), given a frame axis F=1 for the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pqjax.models.layers import Linear, RMSNorm
from pqjax.models.zimage_blocks import (
    ADALN_EMBED_DIM,
    T_EMBED_MID,
    FinalLayer,
    TimestepEmbedder,
    ZImageTransformerBlock,
    grid_ids,
    patchify,
    rope_cos_sin,
    round_up,
    run_sequential,
    unpatchify,
)


@dataclasses.dataclass(frozen=True)
class ZImageConfig:
    """diffusers' ZImageTransformer2DModel config; defaults are diffusers' class defaults."""

    all_patch_size: tuple[int, ...] = (2,)
    all_f_patch_size: tuple[int, ...] = (1,)
    in_channels: int = 16
    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    n_kv_heads: int = 30
    norm_eps: float = 1e-5
    qk_norm: bool = True
    cap_feat_dim: int = 2560
    siglip_feat_dim: int | None = None
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: tuple[int, ...] = (32, 48, 48)
    axes_lens: tuple[int, ...] = (1024, 512, 512)

    def __post_init__(self):
        if self.siglip_feat_dim is not None:
            raise ValueError(
                f"siglip_feat_dim={self.siglip_feat_dim}: the Omni variant (SigLIP features, "
                "nested-list inputs) is not supported; only siglip_feat_dim=None"
            )
        if self.n_kv_heads != self.n_heads:
            raise ValueError(
                f"n_kv_heads={self.n_kv_heads} != n_heads={self.n_heads}: diffusers builds k/v "
                "with n_heads heads, so grouped-query checkpoints do not fit"
            )
        if len(self.all_patch_size) != len(self.all_f_patch_size):
            raise ValueError(
                f"all_patch_size {self.all_patch_size} and all_f_patch_size "
                f"{self.all_f_patch_size} must have the same length"
            )
        if len(self.axes_dims) != 3 or len(self.axes_lens) != 3:
            raise ValueError(
                f"axes_dims {self.axes_dims} and axes_lens {self.axes_lens} must have 3 entries "
                "(frame/text, height, width)"
            )
        if any(d % 2 for d in self.axes_dims):
            raise ValueError(f"axes_dims {self.axes_dims}: every entry must be even")
        if sum(self.axes_dims) != self.head_dim:
            raise ValueError(
                f"axes_dims {self.axes_dims} must sum to the head dim dim // n_heads = "
                f"{self.head_dim}"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def adaln_dim(self) -> int:
        return min(self.dim, ADALN_EMBED_DIM)

    @property
    def patch_keys(self) -> tuple[str, ...]:
        return tuple(f"{p}-{f}" for p, f in zip(self.all_patch_size, self.all_f_patch_size))


# Z-Image-Turbo (Tongyi-MAI/Z-Image-Turbo, transformer/config.json). Sources: diffusers'
# class defaults (the Turbo architecture: 3840 wide, 30 layers x 30 heads, 2+2 refiners),
# cap_feat_dim 2560 = Qwen3-4B's hidden size, 16 latent channels (FLUX VAE); axes_lens
# (1536, 512, 512) is from memory of the published config (diffusers' default is 1024 for the
# first axis) and changes no parameter. 6.15 B parameters.
PRESETS: dict[str, ZImageConfig] = {
    "z-image-turbo": ZImageConfig(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=3840,
        n_layers=30,
        n_refiner_layers=2,
        n_heads=30,
        n_kv_heads=30,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=2560,
        siglip_feat_dim=None,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=(32, 48, 48),
        axes_lens=(1536, 512, 512),
    ),
}


class ZImageTransformer2DModel(nnx.Module):
    """The Z-Image transformer. Parameters in `dtype`; see the module docstring for the calls."""

    def __init__(self, config: ZImageConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.config = c = config
        dim = c.dim

        def block(modulation: bool) -> ZImageTransformerBlock:
            return ZImageTransformerBlock(
                dim, c.n_heads, norm_eps=c.norm_eps, qk_norm=c.qk_norm, modulation=modulation,
                dtype=dtype, rngs=rngs,
            )

        sizes = list(zip(c.all_patch_size, c.all_f_patch_size))
        self.all_x_embedder = nnx.Dict(
            {f"{p}-{f}": Linear(f * p * p * c.in_channels, dim, dtype=dtype, rngs=rngs)
             for p, f in sizes}
        )
        self.all_final_layer = nnx.Dict(
            {f"{p}-{f}": FinalLayer(dim, p * p * f * c.in_channels, dtype=dtype, rngs=rngs)
             for p, f in sizes}
        )
        self.noise_refiner = nnx.List([block(True) for _ in range(c.n_refiner_layers)])
        self.context_refiner = nnx.List([block(False) for _ in range(c.n_refiner_layers)])
        self.t_embedder = TimestepEmbedder(c.adaln_dim, T_EMBED_MID, dtype=dtype, rngs=rngs)
        self.cap_embedder = nnx.List(
            [
                RMSNorm(c.cap_feat_dim, eps=c.norm_eps, dtype=dtype),
                Linear(c.cap_feat_dim, dim, dtype=dtype, rngs=rngs),
            ]
        )
        self.x_pad_token = nnx.Param(jnp.zeros((1, dim), dtype))
        self.cap_pad_token = nnx.Param(jnp.zeros((1, dim), dtype))
        self.layers = nnx.List([block(True) for _ in range(c.n_layers)])

    # ---- checks on Python-level shapes -------------------------------------------------------

    def _patch_key(self, patch_size: int, f_patch_size: int) -> str:
        key = f"{patch_size}-{f_patch_size}"
        if key not in self.config.patch_keys:
            raise ValueError(
                f"(patch_size, f_patch_size) = ({patch_size}, {f_patch_size}) is not in the "
                f"config's all_patch_size/all_f_patch_size pairs {self.config.patch_keys}"
            )
        return key

    def _check_latent(self, shape: tuple[int, ...], p: int, pf: int, ndim: int) -> None:
        if len(shape) != ndim:
            raise ValueError(f"latents of shape {shape}: expected {ndim} axes, (B,) C, F, H, W")
        c, f, h, w = shape[-4:]
        if c != self.config.in_channels:
            raise ValueError(f"latents have {c} channels, config.in_channels is "
                             f"{self.config.in_channels}")
        if f % pf or h % p or w % p:
            raise ValueError(f"latent (F, H, W) = {(f, h, w)} is not divisible by the patch "
                             f"(f_patch_size, patch_size, patch_size) = {(pf, p, p)}")

    def _check_positions(self, max_first: int, ht: int, wt: int) -> None:
        lens = self.config.axes_lens
        if max_first >= lens[0] or ht > lens[1] or wt > lens[2]:
            raise ValueError(
                f"RoPE positions up to ({max_first}, {ht - 1}, {wt - 1}) exceed config.axes_lens "
                f"{lens} (caption padded length + latent frames, latent height/width in tokens)"
            )

    # ---- the computation ---------------------------------------------------------------------

    def _rope(self, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        c = self.config
        return rope_cos_sin(ids, c.axes_dims, c.axes_lens, c.rope_theta)

    def embed_tokens(
        self,
        x_tokens: jax.Array,
        x_ids: jax.Array,
        x_lens: jax.Array,
        cap_feats: jax.Array,
        cap_lens: jax.Array,
        timestep: jax.Array,
        *,
        patch_size: int = 2,
        f_patch_size: int = 1,
    ) -> dict[str, Any]:
        """What the refiners read: image tokens `x` with their mask and RoPE tables, caption
        tokens `cap` with theirs, and the t-embedding `adaln` (arguments: `forward_tokens`).
        Buffers are padded to multiples of 32."""
        c = self.config
        key = self._patch_key(patch_size, f_patch_size)
        b, n_x = x_tokens.shape[:2]
        n_c = cap_feats.shape[1]
        # Buffers rounded up to 32 so every item's 32-padded span fits.
        nx_pad, nc_pad = round_up(n_x), round_up(n_c)
        x_tokens = jnp.pad(x_tokens, ((0, 0), (0, nx_pad - n_x), (0, 0)))
        x_ids = jnp.pad(jnp.asarray(x_ids, jnp.int32), ((0, 0), (0, nx_pad - n_x), (0, 0)))
        cap_feats = jnp.pad(cap_feats, ((0, 0), (0, nc_pad - n_c), (0, 0)))
        x_lens = jnp.broadcast_to(jnp.asarray(x_lens, jnp.int32), (b,))
        cap_lens = jnp.broadcast_to(jnp.asarray(cap_lens, jnp.int32), (b,))
        t = jnp.broadcast_to(jnp.asarray(timestep), (b,))

        x = self.all_x_embedder[key](x_tokens)
        adaln = self.t_embedder(t * c.t_scale).astype(x.dtype)

        # Image: pad tokens after each image, positions (0, 0, 0) there.
        pos = jnp.arange(nx_pad)[None, :]
        real = pos < x_lens[:, None]
        x = jnp.where(real[..., None], x, self.x_pad_token[...].astype(x.dtype))
        x_ids = jnp.where(real[..., None], x_ids, 0)
        x_mask = pos < round_up(x_lens)[:, None]

        # Caption: pad tokens keep counting positions (1 + j, 0, 0), as in diffusers.
        cap = run_sequential(self.cap_embedder, cap_feats)
        cpos = jnp.arange(nc_pad)[None, :]
        cap = jnp.where((cpos < cap_lens[:, None])[..., None], cap,
                        self.cap_pad_token[...].astype(cap.dtype))
        cap_mask = cpos < round_up(cap_lens)[:, None]
        # Masked rows get position 0: any position stays finite in the RoPE tables.
        first = jnp.where(cap_mask, cpos + 1, 0)
        cap_rope = self._rope(jnp.stack([first, 0 * first, 0 * first], axis=-1))
        return {"x": x, "x_mask": x_mask, "x_rope": self._rope(x_ids), "cap": cap,
                "cap_mask": cap_mask, "cap_rope": cap_rope, "adaln": adaln}

    @staticmethod
    def join(carry: dict[str, Any]) -> dict[str, Any]:
        """The refined image and caption tokens as one sequence `u` `[image; caption]` (masked
        gaps between them change nothing but summation order), with its mask and RoPE."""
        u = jnp.concatenate([carry["x"], carry["cap"]], axis=1)
        mask = jnp.concatenate([carry["x_mask"], carry["cap_mask"]], axis=1)
        rope = tuple(jnp.concatenate(pair, axis=1)
                     for pair in zip(carry["x_rope"], carry["cap_rope"]))
        return {"u": u, "mask": mask, "rope": rope, "adaln": carry["adaln"]}

    def final(self, u: jax.Array, adaln: jax.Array, n_x: int, patch_size: int,
              f_patch_size: int) -> jax.Array:
        """The final layer, per token, on the first `n_x` (image) tokens of `u`."""
        return self.all_final_layer[self._patch_key(patch_size, f_patch_size)](u[:, :n_x], adaln)

    def forward_tokens(
        self,
        x_tokens: jax.Array,
        x_ids: jax.Array,
        x_lens: jax.Array,
        cap_feats: jax.Array,
        cap_lens: jax.Array,
        timestep: jax.Array,
        *,
        patch_size: int = 2,
        f_patch_size: int = 1,
    ) -> jax.Array:
        """The model on patchified, right-padded buffers (fixed shapes, jit-friendly).

        x_tokens: `(B, Nx, f_patch * patch^2 * C)`; x_ids: `(B, Nx, 3)` int RoPE positions of
        the real image tokens, within config.axes_lens (outside: NaN), those of pad tokens
        are replaced by (0, 0, 0); x_lens: `(B,)` real image tokens per item; cap_feats:
        `(B, Nc, cap_feat_dim)`; cap_lens: `(B,)`; timestep: `(B,)` as the pipeline passes it
        (1 - sigma). Tokens past a length, up to its next multiple of 32, become pad tokens;
        those further on are masked out.
        Returns `(B, Nx, patch^2 * f_patch * C)` (rows past x_lens are meaningless).
        """
        carry = self.embed_tokens(x_tokens, x_ids, x_lens, cap_feats, cap_lens, timestep,
                                  patch_size=patch_size, f_patch_size=f_patch_size)
        for layer in self.noise_refiner:
            carry["x"] = layer(carry["x"], carry["x_mask"], carry["x_rope"], carry["adaln"])
        for layer in self.context_refiner:
            carry["cap"] = layer(carry["cap"], carry["cap_mask"], carry["cap_rope"])
        carry = self.join(carry)
        for layer in self.layers:
            carry["u"] = layer(carry["u"], carry["mask"], carry["rope"], carry["adaln"])
        return self.final(carry["u"], carry["adaln"], x_tokens.shape[1], patch_size,
                          f_patch_size)

    def batch_tokens(
        self,
        latents: jax.Array,
        timestep: jax.Array,
        cap_feats: jax.Array,
        cap_lens: jax.Array | None = None,
        *,
        patch_size: int = 2,
        f_patch_size: int = 1,
    ) -> tuple[jax.Array, ...]:
        """`forward_batch`'s arguments -> `forward_tokens`' positional ones (x_tokens, x_ids,
        x_lens, cap_feats, cap_lens, timestep)."""
        self._check_latent(latents.shape, patch_size, f_patch_size, 5)
        b, _, f, h, w = latents.shape
        ft, ht, wt = f // f_patch_size, h // patch_size, w // patch_size
        n_c = cap_feats.shape[1]
        self._check_positions(round_up(n_c) + ft, ht, wt)  # bound for any cap_lens <= L
        if cap_lens is None:
            cap_lens = jnp.full((b,), n_c, jnp.int32)
        cap_lens = jnp.broadcast_to(jnp.asarray(cap_lens, jnp.int32), (b,))
        first_axis = jnp.asarray([1, 0, 0], jnp.int32)
        offset = (round_up(cap_lens) + 1)[:, None, None] * first_axis
        x_ids = jnp.asarray(grid_ids(ft, ht, wt))[None] + offset
        return (patchify(latents, patch_size, f_patch_size), x_ids, jnp.full((b,), ft * ht * wt),
                cap_feats, cap_lens, timestep)

    def forward_batch(
        self,
        latents: jax.Array,
        timestep: jax.Array,
        cap_feats: jax.Array,
        cap_lens: jax.Array | None = None,
        *,
        patch_size: int = 2,
        f_patch_size: int = 1,
    ) -> jax.Array:
        """Batched, fixed-shape forward for the jit'd sampler.

        latents: `(B, C, F, H, W)` (one size for the batch); timestep: `(B,)` = 1 - sigma;
        cap_feats: `(B, L, cap_feat_dim)` right-padded; cap_lens: `(B,)` int (None: all L).
        Returns `(B, C, F, H, W)`, item i equal to diffusers' output for
        `x=[latents[i]], cap_feats=[cap_feats[i, :cap_lens[i]]]`.
        """
        args = self.batch_tokens(latents, timestep, cap_feats, cap_lens,
                                 patch_size=patch_size, f_patch_size=f_patch_size)
        out = self.forward_tokens(*args, patch_size=patch_size, f_patch_size=f_patch_size)
        return unpatchify(out, latents.shape[2:], patch_size, f_patch_size)

    def __call__(
        self,
        x: Sequence[jax.Array],
        t: jax.Array,
        cap_feats: Sequence[jax.Array],
        *,
        patch_size: int = 2,
        f_patch_size: int = 1,
    ) -> list[jax.Array]:
        """diffusers' forward (basic mode): same meaning and result.

        x: list of B latents `(C, F, H, W)`, sizes may differ; t: `(B,)` = 1 - sigma;
        cap_feats: list of B caption features `(L_i, cap_feat_dim)`. Returns the list of B
        predictions `(C, F, H, W)` (diffusers' `.sample`).
        """
        if len(x) == 0 or isinstance(x[0], list | tuple):
            raise ValueError("x must be a non-empty flat list of (C, F, H, W) latents; nested "
                             "lists (Omni mode) are not supported")
        if len(cap_feats) != len(x):
            raise ValueError(f"{len(x)} latents but {len(cap_feats)} caption features")
        p, pf = patch_size, f_patch_size
        tokens, ids, lens, sizes = [], [], [], []
        for lat, cap in zip(x, cap_feats):
            lat = jnp.asarray(lat)
            self._check_latent(lat.shape, p, pf, 4)
            _, f, h, w = lat.shape
            ft, ht, wt = f // pf, h // p, w // p
            cap_pad = round_up(int(cap.shape[0]))
            self._check_positions(cap_pad + ft, ht, wt)
            grid = grid_ids(ft, ht, wt)
            grid[:, 0] += cap_pad + 1
            tokens.append(patchify(lat[None], p, pf)[0])
            ids.append(grid)
            lens.append(ft * ht * wt)
            sizes.append((f, h, w))
        n_x = max(lens)
        n_c = max(int(cap.shape[0]) for cap in cap_feats)
        out = self.forward_tokens(
            jnp.stack([jnp.pad(tok, ((0, n_x - len(tok)), (0, 0))) for tok in tokens]),
            jnp.asarray(np.stack([np.pad(i, ((0, n_x - len(i)), (0, 0))) for i in ids])),
            jnp.asarray(lens, jnp.int32),
            jnp.stack([jnp.pad(jnp.asarray(cap), ((0, n_c - cap.shape[0]), (0, 0)))
                       for cap in cap_feats]),
            jnp.asarray([cap.shape[0] for cap in cap_feats], jnp.int32),
            jnp.asarray(t),
            patch_size=p,
            f_patch_size=pf,
        )
        return [unpatchify(out[i : i + 1], size, p, pf)[0] for i, size in enumerate(sizes)]
