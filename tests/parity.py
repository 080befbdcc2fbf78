"""Shared helpers for parity tests against torch reference modules."""

from __future__ import annotations

import numpy as np

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
