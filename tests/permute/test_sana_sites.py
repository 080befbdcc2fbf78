"""SANA's permutation sites: random valid orders at every site leave the output unchanged, and
the sites cover every quantized Linear input of each block but the cross-attention query."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pqjax import permute
from pqjax.models.sana import SanaConfig, SanaTransformer2DModel
from pqjax.quantize import QuantConfig, quantizable
from tests.parity import assert_close_rel, random_nnx, rel_err

CONFIGS = {
    # SANA-1.5-like: qk RMSNorm across heads, non-affine norms, cross heads unlike self heads.
    "qk_norm": SanaConfig(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
        num_layers=2, num_cross_attention_heads=4, cross_attention_head_dim=6,
        cross_attention_dim=16, caption_channels=12, mlp_ratio=2.5, sample_size=8,
        qk_norm="rms_norm_across_heads",
    ),
    # every option on: guidance embedding, sin-cos positions, patch 2, biases, affine norm2.
    "all_options": SanaConfig(
        in_channels=4, out_channels=8, num_attention_heads=3, attention_head_dim=8,
        num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=12,
        cross_attention_dim=24, caption_channels=10, mlp_ratio=1.5, attention_bias=True,
        sample_size=8, patch_size=2, norm_elementwise_affine=True, norm_eps=1e-5,
        interpolation_scale=1.0, guidance_embeds=True,
    ),
}


def sana_inputs(config: SanaConfig, batch: int = 3, seed: int = 0) -> dict[str, jax.Array]:
    """Keyword inputs: latents `(b, in, 6, 8)`, a 7-token caption with padding, timesteps."""
    rng = np.random.default_rng(seed)
    seq = 7
    lengths = np.array([seq - 2 * i for i in range(batch)])
    out = {
        "hidden_states": jnp.asarray(
            rng.standard_normal((batch, config.in_channels, 6, 8)), jnp.float32
        ),
        "encoder_hidden_states": jnp.asarray(
            rng.standard_normal((batch, seq, config.caption_channels)), jnp.float32
        ),
        "encoder_attention_mask": jnp.asarray(np.arange(seq)[None] < lengths[:, None], jnp.int32),
        "timestep": jnp.asarray(np.linspace(900.0, 40.0, batch), jnp.float32),
    }
    if config.guidance_embeds:
        out["guidance"] = jnp.asarray(np.linspace(0.45, 0.1, batch), jnp.float32)
    return out


def random_orders(sites: list[permute.Site], seed: int) -> dict[str, np.ndarray]:
    return {s.name: s.random(jax.random.key(seed + i)) for i, s in enumerate(sites)}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request):
    config = CONFIGS[request.param]
    model = random_nnx(SanaTransformer2DModel, config, 0.2)
    inputs = sana_inputs(config)
    return request.param, config, model, inputs, np.asarray(model(**inputs))


def test_sana_absorb_is_exact(case):
    name, config, model, inputs, ref = case
    sites = permute.sites(model)
    assert len(sites) == 5 * config.num_layers + 1
    assert {s.kind for s in sites} == {"norm", "attn_out", "ffn_hidden"}
    orders = random_orders(sites, 0)
    assert all(not np.array_equal(p, np.arange(len(p))) for p in orders.values())
    permuted = permute.absorb(model, orders)
    assert_close_rel(np.asarray(permuted(**inputs)), ref, 1e-5, f"SANA {name}")
    # the parameters did move: the GLU's depthwise filters and the block's modulation table
    for path in ("transformer_blocks.1.ff.conv_depth.kernel",
                 "transformer_blocks.0.scale_shift_table",
                 "caption_projection.linear_2.kernel"):
        a = np.asarray(permute.module_at(model, path)[...])
        b = np.asarray(permute.module_at(permuted, path)[...])
        assert not np.array_equal(a, b), path
    assert permute.module_at(permuted, "transformer_blocks.0.norm1").perm is not None
    assert permute.module_at(model, "transformer_blocks.0.norm1").perm is None


@pytest.mark.parametrize(
    "site, dropped",
    [
        ("transformer_blocks.0.norm1", "scale_shift_table"),  # the table rows
        ("transformer_blocks.1.ff.hidden", "conv_depth"),  # the depthwise filters
        ("transformer_blocks.1.ff.hidden", "conv_inverted.kernel"),  # the GLU halves
        ("transformer_blocks.0.attn2.out", "to_v"),
        ("caption_norm", "caption_norm.scale"),
    ],
)
def test_every_edit_is_needed(case, site, dropped):
    """Leaving out one of a site's edits changes the output: the exactness above is earned."""
    name, _, model, inputs, ref = case
    sites = permute.sites(model)
    target = next(s for s in sites if s.name == site)
    kept = tuple(e for e in target.edits if dropped not in e.param)
    assert len(kept) < len(target.edits)
    broken = dataclasses.replace(target, edits=kept)
    site_list = [broken if s.name == site else s for s in sites]
    order = {site: target.random(jax.random.key(7))}
    out = np.asarray(permute.absorb(model, order, site_list=site_list)(**inputs))
    assert rel_err(out, ref) > 1e-3, f"{name}: dropping {dropped} from {site} changed nothing"
    exact = np.asarray(permute.absorb(model, order)(**inputs))
    assert_close_rel(exact, ref, 1e-5, f"SANA {name}, {site} alone")


def test_sites_cover_the_quantized_block_inputs(case):
    _, config, model, _, _ = case
    sites = permute.sites(model)
    owner: dict[str, str] = {}
    for s in sites:
        for c in s.consumers:
            assert c not in owner, f"{c} read by {owner.get(c)} and {s.name}"
            owner[c] = s.name
    targets = quantizable(model, QuantConfig())
    assert set(owner) <= set(targets)  # sites name only quantized Linears
    for i, block in enumerate(model.transformer_blocks):
        p = f"transformer_blocks.{i}"
        inside = {t for t in targets if t.startswith(f"{p}.")}
        expected = {f"{p}.attn{j}.{n}" for j in (1, 2) for n in ("to_q", "to_k", "to_v")}
        expected |= {f"{p}.attn1.to_out.0", f"{p}.attn2.to_out.0"}
        expected |= {f"{p}.ff.conv_inverted", f"{p}.ff.conv_point"}
        assert inside == expected
        # by design only the cross-attention query (the raw residual stream) has no site
        assert inside - set(owner) == {f"{p}.attn2.to_q"}
        assert owner[f"{p}.attn2.to_k"] == owner[f"{p}.attn2.to_v"] == "caption_norm"
        assert owner[f"{p}.ff.conv_point"] == f"{p}.ff.hidden"
        hidden = next(s for s in sites if s.name == f"{p}.ff.hidden")
        assert hidden.dim == block.ff.hidden
        # one order for both GLU halves; only the depthwise value half takes a scale
        roles = {(e.param.rsplit(".", 2)[-2], e.offset, e.role) for e in hidden.edits}
        h = block.ff.hidden
        assert roles == {("conv_inverted", 0, "perm_only"), ("conv_inverted", h, "perm_only"),
                         ("conv_depth", 0, "linear"), ("conv_depth", h, "perm_only")}
        heads = {s.name: s.segments for s in sites if s.kind == "attn_out" and s.name.startswith(p)}
        assert heads == {
            f"{p}.attn1.out": ((config.inner_dim, config.attention_head_dim),),
            f"{p}.attn2.out": ((config.num_cross_attention_heads
                                * config.cross_attention_head_dim,
                                config.cross_attention_head_dim),),
        }
    # the non-block Linears (embedders, caption projection, proj_out) stay 16-bit by default
    assert all(t.startswith("transformer_blocks.") for t in targets)
