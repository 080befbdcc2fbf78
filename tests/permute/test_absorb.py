"""Absorbing permutations keeps the function: every site, random valid orders, float32."""

from __future__ import annotations

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import convert  # noqa: E402
from pqjax import permute  # noqa: E402
from tests.models.test_flux import CONFIGS, make_inputs, torch_flux  # noqa: E402
from tests.parity import assert_close_rel, to_jax  # noqa: E402


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def flux(request, tmp_path_factory):
    cfg = CONFIGS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    torch_flux(cfg).save_pretrained(folder)
    model = convert.load_transformer(folder)
    inputs = {k: to_jax(v) for k, v in make_inputs(cfg, batch=2, h=3, w=4, n_txt=5).items()}
    return model, inputs


def test_random_permutations_at_every_site_keep_the_output(flux):
    model, inputs = flux
    sites = permute.sites(model)
    c = model.config
    assert len(sites) == 7 * c.num_layers + 2 * c.num_single_layers + 1
    perms = {s.name: s.random(jax.random.key(i)) for i, s in enumerate(sites)}
    assert all(s.is_valid(perms[s.name]) for s in sites)
    assert any(not np.array_equal(p, np.arange(len(p))) for p in perms.values())
    permuted = permute.absorb(model, perms)
    ref = np.asarray(model(**inputs))
    assert_close_rel(np.asarray(permuted(**inputs)), ref, 1e-5, "absorbed model")
    # the input model is untouched; the norms of the copy read through the permutations
    assert model.transformer_blocks[0].norm1.norm.perm is None
    assert permuted.transformer_blocks[0].norm1.norm.perm is not None
    np.testing.assert_array_equal(np.asarray(model(**inputs)), ref)


def test_absorbing_twice_composes(flux):
    model, inputs = flux
    sites = permute.sites(model)
    first = {s.name: s.random(jax.random.key(10 + i)) for i, s in enumerate(sites)}
    second = {s.name: s.random(jax.random.key(100 + i)) for i, s in enumerate(sites)}
    twice = permute.absorb(permute.absorb(model, first), second)
    assert_close_rel(np.asarray(twice(**inputs)), np.asarray(model(**inputs)), 1e-5, "twice")


def test_a_non_identity_order_really_changes_the_weights(flux):
    model, _ = flux
    site = next(s for s in permute.sites(model) if s.kind == "attn_out")
    perm = site.random(jax.random.key(3))
    out = permute.absorb(model, {site.name: perm})
    before = np.asarray(permute.module_at(model, site.consumers[0]).kernel[...])
    after = np.asarray(permute.module_at(out, site.consumers[0]).kernel[...])
    np.testing.assert_array_equal(after, before[perm])


def test_invalid_orders_are_refused(flux):
    model, _ = flux
    sites = {s.kind: s for s in permute.sites(model)}
    attn = sites["attn_out"]
    cross_head = np.roll(np.arange(attn.dim), 1)  # moves a channel into the next head
    assert not attn.is_valid(cross_head)
    with pytest.raises(ValueError, match="not a valid permutation"):
        permute.absorb(model, {attn.name: cross_head})
    with pytest.raises(ValueError, match="not a valid permutation"):
        permute.absorb(model, {attn.name: np.zeros(attn.dim, int)})
    with pytest.raises(KeyError, match="unknown sites"):
        permute.absorb(model, {"nowhere": np.arange(3)})


def test_site_layout_for_flux(flux):
    model, _ = flux
    by_name = {s.name: s for s in permute.sites(model)}
    c = model.config
    d, hd = c.inner_dim, c.attention_head_dim
    norm1 = by_name["transformer_blocks.0.norm1"]
    assert norm1.consumers == tuple(
        f"transformer_blocks.0.attn.{n}" for n in ("to_q", "to_k", "to_v")
    )
    attn = by_name["transformer_blocks.0.attn.out"]
    assert attn.consumers == (
        "transformer_blocks.0.attn.to_out.0",
        "transformer_blocks.0.attn.to_add_out",
    )
    assert attn.segments == ((d, hd),)
    if c.num_single_layers:
        proj = by_name["single_transformer_blocks.0.proj_out.in"]
        assert proj.segments == ((d, hd), (4 * d, 4 * d))
    # q/k outputs are never permuted: no edit touches to_q/to_k/add_q/add_k columns
    for s in by_name.values():
        for e in s.edits:
            assert not any(k in e.param for k in ("to_q.", "to_k.", "add_q_proj.", "add_k_proj."))
