"""Shared helpers for parity tests against torch reference modules."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# The tiny FLUX the quantization tests share: one double and one single block, inner dim 64
# (2 heads of 32), guidance embedding on (diffusers FluxTransformer2DModel keyword arguments).
TINY_FLUX = dict(
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=32,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=16,
    guidance_embeds=True,
    axes_dims_rope=(8, 12, 12),
    in_channels=8,
)


def rel_err(out, ref) -> float:
    """max |out - ref| / max |ref|: the error relative to the output scale."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert out.shape == ref.shape, f"shape {out.shape} != reference {ref.shape}"
    assert np.isfinite(out).all(), "output has non-finite values"
    return float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))


def assert_close_rel(out, ref, tol: float, what: str = "output") -> None:
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: max abs error is {err:.3g} of the output scale (bound {tol:g})"


def randomize_(module, std: float = 0.2, seed: int = 0) -> None:
    """Overwrite every parameter of a torch module with N(0, std) (norm weights around 1)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            is_norm_weight = "norm" in name and name.endswith("weight") and p.ndim == 1
            p.copy_((1.0 + noise) if is_norm_weight else noise)


def to_jax(t):
    import jax.numpy as jnp

    return jnp.asarray(t.detach().cpu().numpy())


def random_nnx(
    cls: type, config: Any, std: float, seed: int = 0, *, channel_gains: bool = False
) -> nnx.Module:
    """`cls(config)` with N(0, std) parameters (norm scales around 1), filled on the host:
    eager NNX initialisation compiles one random op per parameter shape, slow on CPU.

    channel_gains: each Linear's input rows also get a log-normal gain, so channels differ in
    size as in trained models (what permutations exploit).
    """
    abstract = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        names = [getattr(k, "key", None) for k in path]
        x = rng.normal(0.0, std, leaf.shape).astype(np.float32)
        if "scale" in names:
            x = 1.0 + x
        elif channel_gains and names[-1] == "kernel" and len(leaf.shape) == 2:
            x = x * np.exp(0.8 * rng.standard_normal((leaf.shape[0], 1))).astype(np.float32)
        return jnp.asarray(x)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))
