"""SANA transformer: parity with diffusers' SanaTransformer2DModel, checkpoint round trip,
the full-size preset's parameter count, config validation."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import SanaTransformer2DModel as TorchSana
from flax import nnx

import convert
from convert import registry
from pqjax.models import configs
from pqjax.models.sana import PRESETS, SanaConfig, SanaTransformer2DModel, sincos_pos_embed_2d
from tests.parity import assert_close_rel, randomize_, to_jax

TOL = 1e-4

# A: SANA-1.5-like (qk RMSNorm across heads, no guidance), cross heads shaped unlike self heads.
TINY_QK = SanaConfig(
    in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
    num_cross_attention_heads=4, cross_attention_head_dim=6, cross_attention_dim=16,
    caption_channels=12, mlp_ratio=2.5, sample_size=8, qk_norm="rms_norm_across_heads",
)
# B: SANA-1.0-like without qk norm but with every other option switched on: guidance embedding,
# sin-cos positions (interpolation_scale), patch 2, attention bias, affine norm2, out != in.
TINY_ALL = SanaConfig(
    in_channels=4, out_channels=8, num_attention_heads=3, attention_head_dim=8, num_layers=2,
    num_cross_attention_heads=2, cross_attention_head_dim=12, cross_attention_dim=24,
    caption_channels=10, mlp_ratio=1.5, attention_bias=True, sample_size=8, patch_size=2,
    norm_elementwise_affine=True, norm_eps=1e-5, interpolation_scale=1.0, guidance_embeds=True,
)
# C: SANA-Sprint-like: guidance embedding and qk norm.
TINY_SPRINT = dataclasses.replace(TINY_QK, guidance_embeds=True, num_layers=1)


def torch_model(config: SanaConfig, seed: int = 0) -> TorchSana:
    model = TorchSana(**dataclasses.asdict(config)).eval()
    randomize_(model, seed=seed)
    return model


def jax_model(model: TorchSana, tmp_path, dtype=jnp.float32) -> SanaTransformer2DModel:
    """Load via the diffusers folder format, as a real checkpoint would be."""
    folder = tmp_path / "torch"
    model.save_pretrained(folder)
    return convert.load_model(folder, dtype=dtype)


def make_inputs(config: SanaConfig, *, batch: int, height: int, width: int, seq: int, seed: int):
    """Torch inputs: latents, caption, a right-padded caption mask, pipeline-style timesteps."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, height, width, generator=gen)
    ctx = torch.randn(batch, seq, config.caption_channels, generator=gen)
    lengths = [seq - 3 * i for i in range(batch)]  # the first caption unpadded
    mask = (torch.arange(seq)[None] < torch.tensor(lengths)[:, None]).long()
    t = torch.linspace(999.0, 3.7, batch)  # sigma * 1000, fractional
    g = torch.linspace(0.45, 0.1, batch) if config.guidance_embeds else None
    return x, ctx, mask, t, g


def run_both(tm: TorchSana, jm: SanaTransformer2DModel, inputs):
    x, ctx, mask, t, g = inputs
    with torch.no_grad():
        ref = tm(x, encoder_hidden_states=ctx, timestep=t, guidance=g,
                 encoder_attention_mask=mask, return_dict=False)[0]
    out = jm(
        hidden_states=to_jax(x), encoder_hidden_states=to_jax(ctx), timestep=to_jax(t),
        guidance=None if g is None else to_jax(g), encoder_attention_mask=to_jax(mask),
    )
    return out, ref.numpy()


@pytest.mark.parametrize(
    "config, batch, height, width, seq",
    [
        (TINY_QK, 2, 6, 10, 7),
        (TINY_QK, 3, 5, 3, 13),
        (TINY_ALL, 2, 6, 10, 11),
        (TINY_ALL, 2, 7, 9, 5),  # odd sizes: the stride-2 patch conv drops the last row/col
        (TINY_SPRINT, 3, 4, 6, 9),
    ],
    ids=["qk-6x10", "qk-5x3", "all-6x10", "all-odd-7x9", "sprint-4x6"],
)
def test_parity_with_diffusers(config, batch, height, width, seq, tmp_path):
    tm = torch_model(config)
    jm = jax_model(tm, tmp_path)
    out, ref = run_both(tm, jm, make_inputs(config, batch=batch, height=height, width=width,
                                            seq=seq, seed=1))
    assert out.shape == ref.shape
    assert_close_rel(out, ref, TOL)


def test_export_roundtrip_to_diffusers(tmp_path):
    tm = torch_model(TINY_ALL, seed=3)
    jm = jax_model(tm, tmp_path)
    out_dir = convert.export_model(jm, tmp_path / "export")
    back = TorchSana.from_pretrained(out_dir).eval()
    assert back.config.guidance_embeds and back.config.interpolation_scale == 1.0
    for key, value in tm.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value, rtol=0, atol=0, msg=key)
    inputs = make_inputs(TINY_ALL, batch=2, height=6, width=10, seq=6, seed=4)
    out, ref = run_both(back, jm, inputs)
    assert_close_rel(out, ref, TOL)


def test_mask_equals_truncation(tmp_path):
    """Padding masked out by encoder_attention_mask is as if the caption were shorter."""
    jm = jax_model(torch_model(TINY_QK, seed=5), tmp_path)
    x, ctx, _, t, _ = make_inputs(TINY_QK, batch=1, height=4, width=4, seq=9, seed=6)
    x, ctx, t = to_jax(x), to_jax(ctx), to_jax(t)
    mask = jnp.asarray([[1] * 5 + [0] * 4])
    masked = jm(hidden_states=x, encoder_hidden_states=ctx, timestep=t, encoder_attention_mask=mask)
    short = jm(hidden_states=x, encoder_hidden_states=ctx[:, :5], timestep=t)
    assert_close_rel(masked, short, 1e-5)


def test_bfloat16_runs_close_to_float32(tmp_path):
    tm = torch_model(TINY_QK, seed=7)
    jm32 = jax_model(tm, tmp_path)
    jm16 = convert.load_model(tmp_path / "torch", dtype=jnp.bfloat16)
    x, ctx, mask, t, _ = make_inputs(TINY_QK, batch=2, height=6, width=10, seq=7, seed=8)
    kw = dict(encoder_attention_mask=to_jax(mask), timestep=to_jax(t))
    out32 = jm32(hidden_states=to_jax(x), encoder_hidden_states=to_jax(ctx), **kw)
    out16 = jm16(hidden_states=to_jax(x).astype(jnp.bfloat16),
                 encoder_hidden_states=to_jax(ctx).astype(jnp.bfloat16), **kw)
    assert out16.dtype == jnp.bfloat16
    assert_close_rel(out16, out32, 5e-2)


@pytest.mark.parametrize("height, width, scale", [(3, 5, 1.0), (8, 8, 2.0), (7, 4, 0.5)])
def test_sincos_pos_embed_matches_diffusers(height, width, scale):
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    ref = get_2d_sincos_pos_embed(24, (height, width), base_size=4, interpolation_scale=scale)
    out = sincos_pos_embed_2d(24, height, width, base_size=4, interpolation_scale=scale)
    np.testing.assert_allclose(out, ref.float().numpy(), rtol=0, atol=1e-6)


def count_params(model: nnx.Module) -> int:
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_preset_parameter_count():
    config = PRESETS["sana-1.5-1.6b"]
    model = nnx.eval_shape(lambda: SanaTransformer2DModel(config, rngs=nnx.Rngs(0)))
    n = count_params(model)
    assert round(n / 1e9, 2) == 1.60
    with torch.device("meta"):
        ref = TorchSana(**dataclasses.asdict(config))
    assert n == sum(p.numel() for p in ref.parameters()) == 1_604_641_952
    # and the key sets agree, so a real checkpoint would load
    from convert import bridge

    assert set(bridge.param_map(model)) == set(ref.state_dict())


def test_config_roundtrip_and_registry():
    raw = configs.to_dict(TINY_ALL, "SanaTransformer2DModel")
    spec = registry.spec_for_class_name(raw["_class_name"], "test")
    assert spec.parse(raw, "test") == TINY_ALL
    # a SANA-1.0 config.json predates qk_norm / guidance fields: diffusers' defaults apply
    old = {k: v for k, v in raw.items() if k not in ("qk_norm", "guidance_embeds")}
    assert spec.parse(old, "test").qk_norm is None
    with pytest.raises(configs.ConfigError, match="use_pe"):
        spec.parse({**raw, "use_pe": False}, "test")


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(qk_norm="layer_norm"), "qk_norm"),
        (dict(cross_attention_dim=None), "cross_attention_dim"),
        (dict(cross_attention_dim=32), "cross_attention_dim"),
        (dict(num_cross_attention_heads=None), "num_cross_attention_heads"),
        (dict(patch_size=0), "patch_size"),
        (
            dict(interpolation_scale=1.0, attention_head_dim=3, cross_attention_dim=6),
            "interpolation_scale",
        ),
    ],
)
def test_unsupported_config_values_raise(change, field):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(TINY_QK, **change)


def test_guidance_argument_must_match_config():
    model = SanaTransformer2DModel(TINY_SPRINT, rngs=nnx.Rngs(0))
    x = jnp.zeros((1, 4, 2, 2))
    ctx = jnp.zeros((1, 3, TINY_SPRINT.caption_channels))
    with pytest.raises(ValueError, match="guidance"):
        model(hidden_states=x, encoder_hidden_states=ctx, timestep=jnp.ones((1,)))
    plain = SanaTransformer2DModel(TINY_QK, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="guidance_embeds"):
        plain(hidden_states=x, encoder_hidden_states=ctx, timestep=jnp.ones((1,)),
              guidance=jnp.ones((1,)))
