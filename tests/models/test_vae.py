"""Parity of the NNX AutoencoderKL with diffusers', checkpoint round trips, latent scaling."""

from __future__ import annotations

import dataclasses
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
from pqjax.models.vae import (  # noqa: E402
    FLUX_VAE_CONFIG,
    AutoencoderKL,
    AutoencoderKLConfig,
    DiagonalGaussian,
    latents_to_vae,
    vae_to_latents,
)
from tests.parity import assert_close_rel, randomize_, to_jax  # noqa: E402

CONFIGS = {
    # FLUX's layout scaled down: 16 latent channels, no quant convs, mid attention, 3 levels.
    "flux_like": dict(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=2, norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=0.3611, shift_factor=0.1159,
    ),
    # SD-style: quant convs on both sides, 4 latent channels.
    "sd_like": dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=4,
    ),
    # Mixed quant convs, no mid-block attention, another activation, other channel counts.
    "no_attn_gelu": dict(
        in_channels=4, out_channels=2, latent_channels=3, block_out_channels=(8, 8, 12),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=4, act_fn="gelu", use_quant_conv=True,
        use_post_quant_conv=False, mid_block_add_attention=False,
    ),
}


def torch_vae(cfg: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(**cfg).eval()
    randomize_(model, std=0.2, seed=seed)
    return model


@nnx.jit
def _decode(model, z):
    return model.decode(z)


@nnx.jit
def _encode(model, x):
    return model.encode(x)


def _downscale(cfg: dict) -> int:
    return 2 ** (len(cfg["block_out_channels"]) - 1)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """(name, torch model, NNX model loaded from the torch model's save_pretrained folder)."""
    name = request.param
    tmodel = torch_vae(CONFIGS[name])
    folder = tmp_path_factory.mktemp(name)
    tmodel.save_pretrained(folder)
    return name, tmodel, convert.load_model(folder)


def test_decode_parity(pair):
    name, tmodel, jmodel = pair
    cfg = CONFIGS[name]
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, cfg["latent_channels"], 5, 7, generator=g)  # batch 2, non-square
    with torch.no_grad():
        ref = tmodel.decode(z).sample.numpy()
    out = np.asarray(_decode(jmodel, to_jax(z)))
    f = _downscale(cfg)
    assert out.shape == (2, cfg["out_channels"], 5 * f, 7 * f)
    assert_close_rel(out, ref, 1e-4, f"{name} decode")


@pytest.mark.parametrize("size", [(5, 7), (21, 30)], ids=["multiple", "odd"])
def test_encode_parity(pair, size):
    """Mean and (clamped) logvar; "odd" image sizes exercise the asymmetric downsample padding."""
    name, tmodel, jmodel = pair
    cfg = CONFIGS[name]
    f = _downscale(cfg)
    h, w = (size[0] * f, size[1] * f) if size == (5, 7) else size
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, cfg["in_channels"], h, w, generator=g)
    with torch.no_grad():
        ref = tmodel.encode(x).latent_dist
    dist = _encode(jmodel, to_jax(x))
    assert_close_rel(dist.mean, ref.mean.numpy(), 1e-4, f"{name} encode mean")
    assert_close_rel(dist.logvar, ref.logvar.numpy(), 1e-4, f"{name} encode logvar")
    assert_close_rel(dist.mode(), ref.mode().numpy(), 1e-4, f"{name} encode mode")


def test_forward_matches_encode_decode(pair):
    name, tmodel, jmodel = pair
    cfg = CONFIGS[name]
    f = _downscale(cfg)
    x = torch.randn(1, cfg["in_channels"], 2 * f, 3 * f, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = tmodel(x).sample.numpy()  # sample_posterior=False: the mode
    out = nnx.jit(lambda m, a: m(a))(jmodel, to_jax(x))
    assert_close_rel(out, ref, 1e-4, f"{name} forward")


def test_export_round_trip(tmp_path):
    """export_model -> diffusers from_pretrained: identical weights, identical decode."""
    cfg = CONFIGS["flux_like"]
    tmodel = torch_vae(cfg, seed=4)
    tmodel.save_pretrained(tmp_path / "src")
    jmodel = convert.load_model(tmp_path / "src")
    convert.export_model(jmodel, tmp_path / "out")
    back = diffusers.AutoencoderKL.from_pretrained(tmp_path / "out").eval()
    for key, value in tmodel.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert _public(back.config) == _public(tmodel.config)
    z = torch.randn(2, cfg["latent_channels"], 3, 5, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref, out = tmodel.decode(z).sample.numpy(), back.decode(z).sample.numpy()
    np.testing.assert_array_equal(out, ref)
    again = convert.load_model(tmp_path / "out")
    assert again.config == jmodel.config
    np.testing.assert_array_equal(_decode(again, to_jax(z)), _decode(jmodel, to_jax(z)))


def _public(config) -> dict:
    """A diffusers config as its config.json would hold it, bookkeeping fields dropped."""
    public = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    return json.loads(json.dumps(public))


def test_flux_preset_matches_diffusers_meta_model():
    """The full-size FLUX VAE: same keys, shapes and parameter count as diffusers' model."""
    with torch.device("meta"):
        tmodel = diffusers.AutoencoderKL(**dataclasses.asdict(FLUX_VAE_CONFIG))
    torch_shapes = {k: tuple(v.shape) for k, v in tmodel.state_dict().items()}
    jmodel = nnx.eval_shape(lambda: AutoencoderKL(FLUX_VAE_CONFIG, rngs=nnx.Rngs(0)))
    specs, _ = bridge.export_arrays(jmodel)
    assert {k: s for k, s, _ in specs} == torch_shapes
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(jmodel, nnx.Param)))
    assert n_params == sum(p.numel() for p in tmodel.parameters()) == 83_819_683


def test_latent_scaling_matches_flux_pipeline():
    """latents_to_vae is FluxPipeline's pre-decode formula; vae_to_latents is its inverse
    (FluxImg2ImgPipeline's `(latents - shift) * scale`)."""
    tcfg = diffusers.AutoencoderKL(**CONFIGS["flux_like"]).config
    cfg = AutoencoderKLConfig(**CONFIGS["flux_like"])
    lat = torch.randn(2, 16, 3, 4, generator=torch.Generator().manual_seed(6))
    ref = (lat / tcfg.scaling_factor) + tcfg.shift_factor
    np.testing.assert_allclose(latents_to_vae(to_jax(lat), cfg), ref.numpy(), atol=1e-6)
    enc_ref = (lat - tcfg.shift_factor) * tcfg.scaling_factor
    np.testing.assert_allclose(vae_to_latents(to_jax(lat), cfg), enc_ref.numpy(), atol=1e-6)
    np.testing.assert_allclose(
        vae_to_latents(latents_to_vae(to_jax(lat), cfg), cfg), lat.numpy(), atol=1e-6
    )
    sd = AutoencoderKLConfig(**CONFIGS["sd_like"])  # shift_factor None counts as 0
    np.testing.assert_allclose(latents_to_vae(to_jax(lat), sd), lat.numpy() / 0.18215, atol=1e-6)
    assert (FLUX_VAE_CONFIG.scaling_factor, FLUX_VAE_CONFIG.shift_factor) == (0.3611, 0.1159)


def test_diagonal_gaussian_sample():
    moments = np.random.default_rng(0).normal(size=(2, 8, 3, 5)).astype(np.float32)
    moments[0, 4:, 0, 0] = (-50.0, 30.0, 0.0, 0.0)  # logvar beyond the clamp on both sides
    dist = DiagonalGaussian.from_moments(jnp.asarray(moments))
    assert dist.mean.shape == (2, 4, 3, 5)
    np.testing.assert_array_equal(dist.logvar[0, :2, 0, 0], [-30.0, 20.0])
    dist = DiagonalGaussian.from_moments(jnp.asarray(moments[1:]))
    key = jax.random.key(1)
    eps = (dist.sample(key) - dist.mean) / dist.std
    np.testing.assert_allclose(eps, jax.random.normal(key, dist.mean.shape), rtol=1e-4, atol=1e-4)
    assert dist.kl().shape == (1,)


def test_bfloat16_decode_close(tmp_path):
    """bf16 weights and activations (load_model dtype=): agreement at bf16 resolution."""
    torch_vae(CONFIGS["flux_like"]).save_pretrained(tmp_path)
    f32 = convert.load_model(tmp_path)
    bf16 = convert.load_model(tmp_path, dtype=jnp.bfloat16)
    z = jax.random.normal(jax.random.key(2), (1, 16, 4, 6))
    out = _decode(bf16, z.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    assert_close_rel(out.astype(jnp.float32), _decode(f32, z), 5e-2, "bf16 decode")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("down_block_types", ["AttnDownEncoderBlock2D", "DownEncoderBlock2D"], "unsupported block"),
        ("up_block_types", ["UpDecoderBlock2D"], "must match"),
        ("act_fn", "tanh", "act_fn"),
        ("norm_num_groups", 3, "not divisible"),
        ("use_tiling", True, "unsupported config field"),
    ],
)
def test_bad_config_is_rejected(field, value, message):
    raw = configs.to_dict(AutoencoderKLConfig(**CONFIGS["sd_like"]), "AutoencoderKL")
    raw[field] = value
    with pytest.raises(configs.ConfigError, match=message) as info:
        configs.from_dict(AutoencoderKLConfig, raw, source="vae/config.json")
    assert "vae/config.json" in str(info.value)


def test_load_rejects_unsupported_config_file(tmp_path):
    torch_vae(CONFIGS["sd_like"]).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["up_block_types"] = ["AttnUpDecoderBlock2D", "UpDecoderBlock2D"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(configs.ConfigError, match="AttnUpDecoderBlock2D"):
        convert.load_model(tmp_path)


def test_bad_input_shape_is_reported(pair):
    _, _, jmodel = pair
    with pytest.raises(ValueError, match="decode input must be NCHW"):
        jmodel.decode(jnp.zeros((1, 5, 7, jmodel.config.latent_channels)))  # NHWC by mistake
