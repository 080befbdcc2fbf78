"""Parity of the NNX Z-Image transformer with diffusers' ZImageTransformer2DModel."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import convert  # noqa: E402
from convert import bridge  # noqa: E402
from pqjax.models import configs  # noqa: E402
from pqjax.models.configs import ConfigError  # noqa: E402
from pqjax.models.zimage import PRESETS, ZImageConfig, ZImageTransformer2DModel  # noqa: E402
from tests.parity import assert_close_rel, random_nnx, randomize_, rel_err, to_jax  # noqa: E402

# Two tiny configs: (a) dim < 256 so the AdaLN width is dim, q/k norms, one patch size;
# (b) dim = 256, no q/k norm, two patch sizes (one with a temporal patch), other eps / theta.
CONFIGS = {
    "small_qknorm": dict(
        dim=64, n_heads=2, n_kv_heads=2, n_layers=2, n_refiner_layers=1, cap_feat_dim=24,
        axes_dims=[8, 12, 12], axes_lens=[256, 64, 64], in_channels=4,
    ),
    "wide_two_patches": dict(
        dim=256, n_heads=4, n_kv_heads=4, n_layers=1, n_refiner_layers=2, cap_feat_dim=20,
        axes_dims=[16, 24, 24], axes_lens=[200, 32, 32], in_channels=3, qk_norm=False,
        all_patch_size=[2, 1], all_f_patch_size=[1, 2], norm_eps=1e-6, rope_theta=10000.0,
    ),
}

# Weight scale per config, chosen so activations stay O(1): without q/k norm and at width 256,
# std 0.2 saturates the softmax and torch's own float32 result drifts 3e-4 from float64.
STD = {"small_qknorm": 0.2, "wide_two_patches": 0.07}

# Per config: (patch_size, f_patch_size), latent (C, F, H, W) per item, caption length per item.
# Token counts are not multiples of 32 (except one that is, to cover "no padding" too), and
# caption lengths differ, so both the 32-padding and the batch masks are exercised.
CASES = {
    "small_qknorm": ((2, 1), [(4, 1, 10, 6), (4, 1, 8, 12), (4, 1, 16, 16)], [7, 40, 32]),
    "wide_two_patches": ((1, 2), [(3, 2, 5, 7), (3, 2, 4, 4)], [33, 5]),
}


def torch_zimage(cfg: dict, std: float = 0.2, seed: int = 0):
    torch.manual_seed(seed)
    model = diffusers.ZImageTransformer2DModel(**cfg).eval()
    randomize_(model, std=std, seed=seed)
    return model


def make_inputs(cfg: dict, shapes, cap_lens, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(*s, generator=g) for s in shapes]
    caps = [torch.randn(n, cfg["cap_feat_dim"], generator=g) for n in cap_lens]
    t = torch.rand(len(shapes), generator=g)
    return xs, t, caps


def torch_forward(tmodel, xs, t, caps, patch=(2, 1)):
    with torch.no_grad():
        out = tmodel(xs, t, caps, patch_size=patch[0], f_patch_size=patch[1], return_dict=False)
    return [o.float().numpy() for o in out[0]]


@nnx.jit(static_argnames=("patch_size", "f_patch_size"))
def list_forward(model, xs, t, caps, patch_size=2, f_patch_size=1):
    return model(xs, t, caps, patch_size=patch_size, f_patch_size=f_patch_size)


TRACES = {"batch": 0}


@nnx.jit
def batch_forward(model, latents, t, caps, cap_lens):
    TRACES["batch"] += 1
    return model.forward_batch(latents, t, caps, cap_lens)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The randomized diffusers model of config (a), and its NNX port loaded from disk."""
    path = tmp_path_factory.mktemp("zimage_small")
    tmodel = torch_zimage(CONFIGS["small_qknorm"])
    tmodel.save_pretrained(path)
    return tmodel, convert.load_transformer(path)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_float32_parity_list_api(name, tmp_path):
    cfg = CONFIGS[name]
    patch, shapes, cap_lens = CASES[name]
    tmodel = torch_zimage(cfg, STD[name])
    tmodel.save_pretrained(tmp_path)
    jmodel = convert.load_transformer(tmp_path)
    xs, t, caps = make_inputs(cfg, shapes, cap_lens)
    ref = torch_forward(tmodel, xs, t, caps, patch)
    out = list_forward(
        jmodel, [to_jax(x) for x in xs], to_jax(t), [to_jax(c) for c in caps],
        patch_size=patch[0], f_patch_size=patch[1],
    )
    assert len(out) == len(ref)
    for i, (o, r) in enumerate(zip(out, ref)):
        assert_close_rel(np.asarray(o), r, 1e-4, f"{name} item {i}")


def test_eager_list_api_matches_jit(small):
    """The list API runs un-jitted too (one item, to keep eager compilation short)."""
    tmodel, jmodel = small
    xs, t, caps = make_inputs(CONFIGS["small_qknorm"], [(4, 1, 4, 6)], [3], seed=3)
    ref = torch_forward(tmodel, xs, t, caps)
    out = jmodel([to_jax(xs[0])], to_jax(t), [to_jax(caps[0])])
    assert_close_rel(np.asarray(out[0]), ref[0], 1e-4, "eager")


def test_batch_api_matches_list_api(small):
    """forward_batch (jit, fixed shapes, lengths as data) == list API == diffusers, per item."""
    tmodel, jmodel = small
    cfg = CONFIGS["small_qknorm"]
    cap_lens = [7, 45, 32]
    xs, t, caps = make_inputs(cfg, [(4, 1, 10, 6)] * 3, cap_lens, seed=1)
    ref = torch_forward(tmodel, xs, t, caps)
    listed = list_forward(jmodel, [to_jax(x) for x in xs], to_jax(t), [to_jax(c) for c in caps])
    # Right-padded caption buffer; the padding holds garbage, which must not matter.
    buf = np.random.default_rng(0).normal(size=(3, 45, cfg["cap_feat_dim"])).astype(np.float32)
    for i, c in enumerate(caps):
        buf[i, : len(c)] = c.numpy()
    latents = jnp.stack([to_jax(x) for x in xs])
    lens = jnp.asarray(cap_lens, jnp.int32)
    batched = np.asarray(batch_forward(jmodel, latents, to_jax(t), jnp.asarray(buf), lens))
    for i in range(3):
        assert rel_err(batched[i], np.asarray(listed[i])) <= 1e-5, f"item {i} batch vs list"
        assert_close_rel(batched[i], ref[i], 1e-4, f"item {i} batch vs diffusers")
    # Other lengths (same buffer shape) reuse the compiled function and still match diffusers.
    traces = TRACES["batch"]
    lens2 = [45, 1, 20]
    out2 = np.asarray(batch_forward(jmodel, latents, to_jax(t), jnp.asarray(buf),
                                    jnp.asarray(lens2, jnp.int32)))
    assert TRACES["batch"] == traces, "new caption lengths retraced forward_batch"
    ref2 = torch_forward(tmodel, xs, t, [torch.from_numpy(buf[i, :n]) for i, n in enumerate(lens2)])
    for i in range(3):
        assert_close_rel(out2[i], ref2[i], 1e-4, f"item {i}, second lengths")


def test_export_roundtrip(tmp_path):
    """NNX model -> export_model -> diffusers from_pretrained -> same outputs."""
    cfg = CONFIGS["wide_two_patches"]
    config = ZImageConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})
    jmodel = random_nnx(ZImageTransformer2DModel, config, STD["wide_two_patches"])
    convert.export_model(jmodel, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["_class_name"] == "ZImageTransformer2DModel"
    tmodel = diffusers.ZImageTransformer2DModel.from_pretrained(tmp_path).eval()
    xs, t, caps = make_inputs(cfg, [(3, 1, 6, 10), (3, 1, 4, 4)], [9, 70], seed=2)
    ref = torch_forward(tmodel, xs, t, caps, (2, 1))
    out = list_forward(jmodel, [to_jax(x) for x in xs], to_jax(t), [to_jax(c) for c in caps])
    for i in range(2):
        assert_close_rel(np.asarray(out[i]), ref[i], 1e-4, f"exported item {i}")


def test_turbo_parameter_count_and_keys():
    """The preset has 6.15 B parameters and exactly diffusers' keys and shapes (meta device)."""
    config = PRESETS["z-image-turbo"]
    abstract = nnx.eval_shape(lambda: ZImageTransformer2DModel(config, rngs=nnx.Rngs(0)))
    count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert round(count / 1e9, 2) == 6.15, count
    assert count == 6_154_908_736
    raw = json.loads(json.dumps(configs.to_dict(config, "ZImageTransformer2DModel")))
    raw.pop("_class_name")
    with torch.device("meta"):
        tmodel = diffusers.ZImageTransformer2DModel(**raw)
    tshapes = {k: tuple(v.shape) for k, v in tmodel.state_dict().items()}
    assert sum(int(np.prod(s)) for s in tshapes.values()) == count
    specs, _ = bridge.export_arrays(abstract)
    assert {k: s for k, s, _ in specs} == tshapes


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("siglip_feat_dim", dict(siglip_feat_dim=32)),
        ("n_kv_heads", dict(n_kv_heads=1)),
        ("axes_dims", dict(axes_dims=(8, 8, 8))),
        ("all_f_patch_size", dict(all_patch_size=(2, 1))),
    ],
)
def test_unsupported_config_values(field, kwargs):
    base = dict(dim=64, n_heads=2, n_kv_heads=2, axes_dims=(8, 12, 12))
    with pytest.raises(ValueError, match=field):
        ZImageConfig(**{**base, **kwargs})


def test_config_json_errors(tmp_path):
    raw = dict(_class_name="ZImageTransformer2DModel", dim=64, n_heads=2, n_kv_heads=2,
               axes_dims=[8, 12, 12], siglip_feat_dim=16)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="siglip_feat_dim"):
        convert.load_model(tmp_path)


def test_bad_calls(small):
    _, jmodel = small
    lat = jnp.zeros((4, 1, 4, 4))
    cap = jnp.zeros((3, 24))
    with pytest.raises(ValueError, match="patch_size"):
        jmodel([lat], jnp.zeros(1), [cap], patch_size=1)
    with pytest.raises(ValueError, match="in_channels"):
        jmodel([jnp.zeros((3, 1, 4, 4))], jnp.zeros(1), [cap])
    with pytest.raises(ValueError, match="axes_lens"):
        jmodel.forward_batch(jnp.zeros((1, 4, 1, 4, 4)), jnp.zeros(1), jnp.zeros((1, 300, 24)))
    with pytest.raises(ValueError, match="expected 4 axes"):
        jmodel([jnp.zeros((4, 4, 4))], jnp.zeros(1), [cap])
    with pytest.raises(ValueError, match="Omni"):
        jmodel([[lat]], jnp.zeros(1), [[cap]])
