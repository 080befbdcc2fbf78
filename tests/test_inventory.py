"""pqjax.inventory lists, from a config alone, exactly the parameters the module builds.

Small configs (every option that changes a parameter set both ways) are compared path for
path and shape for shape with the abstract module (`nnx.eval_shape`); the full presets are
compared with the parameter counts of the released checkpoints.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from pqjax.calibrate import linears
from pqjax.inventory import inventory
from pqjax.models.clip import CLIPTextConfig, CLIPTextModel
from pqjax.models.dcae import AutoencoderDC, AutoencoderDCConfig
from pqjax.models.flux import FluxConfig, FluxTransformer2DModel
from pqjax.models.gemma2 import Gemma2Config, Gemma2Model
from pqjax.models.qwen3 import Qwen3Config, Qwen3Model
from pqjax.models.sana import SanaConfig, SanaTransformer2DModel
from pqjax.models.t5 import T5Config, T5EncoderModel
from pqjax.models.vae import AutoencoderKL, AutoencoderKLConfig
from pqjax.models.zimage import ZImageConfig, ZImageTransformer2DModel

FLUX = dict(num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=12, pooled_projection_dim=6, axes_dims_rope=(2, 2, 4),
            in_channels=4)
SANA = dict(num_attention_heads=2, attention_head_dim=8, num_layers=2,
            num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
            caption_channels=12, in_channels=4, out_channels=4, sample_size=8)
ZIMAGE = dict(dim=32, n_heads=2, n_kv_heads=2, n_layers=2, n_refiner_layers=2, cap_feat_dim=12,
              in_channels=4, axes_dims=(4, 6, 6), axes_lens=(64, 16, 16))
T5 = dict(vocab_size=50, d_model=16, d_kv=4, d_ff=24, num_layers=3, num_heads=2)
CLIP = dict(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=10)
VAE = dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
           block_out_channels=(8, 16), norm_num_groups=4, latent_channels=4)
LM = dict(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
          num_attention_heads=4, num_key_value_heads=2, head_dim=4)
DCAE = dict(latent_channels=4, attention_head_dim=4, decoder_block_out_channels=(8, 16, 16),
            decoder_layers_per_block=(1, 2, 1), decoder_qkv_multiscales=((), (3, 5), (5,)),
            decoder_block_types=("ResBlock", "EfficientViTBlock", "EfficientViTBlock"))

CASES = [
    ("flux", FluxTransformer2DModel, FluxConfig(**FLUX)),
    ("flux-guidance-out", FluxTransformer2DModel,
     FluxConfig(**FLUX, guidance_embeds=True, out_channels=8)),
    ("sana", SanaTransformer2DModel, SanaConfig(**SANA)),
    ("sana-options", SanaTransformer2DModel,
     SanaConfig(**SANA, qk_norm="rms_norm_across_heads", attention_bias=True,
                norm_elementwise_affine=True, guidance_embeds=True, patch_size=2)),
    ("zimage", ZImageTransformer2DModel, ZImageConfig(**ZIMAGE)),
    ("zimage-no-qk-two-patches", ZImageTransformer2DModel,
     ZImageConfig(**ZIMAGE, qk_norm=False, all_patch_size=(2, 1), all_f_patch_size=(1, 1))),
    ("t5-gated", T5EncoderModel, T5Config(**T5, feed_forward_proj="gated-gelu")),
    ("t5-relu", T5EncoderModel, T5Config(**T5)),
    ("clip", CLIPTextModel, CLIPTextConfig(**CLIP)),
    ("vae", AutoencoderKL, AutoencoderKLConfig(**VAE, layers_per_block=2)),
    ("gemma2", Gemma2Model, Gemma2Config(**LM)),
    ("qwen3-bias", Qwen3Model, Qwen3Config(**LM, attention_bias=True)),
    ("dcae-interpolate", AutoencoderDC,
     AutoencoderDCConfig(**DCAE, upsample_block_type="interpolate")),
    ("dcae-pixel-shuffle", AutoencoderDC, AutoencoderDCConfig(**DCAE)),
    ("vae-no-quant-conv-no-attention", AutoencoderKL,
     AutoencoderKLConfig(**VAE, use_quant_conv=False, use_post_quant_conv=False,
                         mid_block_add_attention=False)),
]


class OneKey:
    """Stands in for nnx.Rngs (the models only call `rngs.params()`): under eval_shape the
    values do not matter, and nnx.Rngs' traced counter makes each draw cost more the longer
    the trace (about twice as slow here)."""

    def params(self) -> jax.Array:
        return jax.random.key(0)


@pytest.mark.parametrize("cls, config", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_inventory_equals_the_abstract_module(cls, config):
    model = nnx.eval_shape(lambda: cls(config, dtype=jnp.bfloat16, rngs=OneKey()))
    shapes = {
        ".".join(map(str, path)): tuple(v.get_value().shape)
        for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    inv = inventory(config)
    assert inv.params == shapes
    assert inv.linears == {
        p: (lin.in_features, lin.out_features, lin.bias is not None) for p, lin in linears(model)
    }


def test_full_presets_match_the_released_checkpoints():
    from pqjax.models.clip import CLIP_L_FLUX
    from pqjax.models.sana import PRESETS as SANA_PRESETS
    from pqjax.models.t5 import T5_XXL_FLUX
    from pqjax.models.vae import FLUX_VAE_CONFIG
    from pqjax.models.zimage import PRESETS as ZIMAGE_PRESETS

    # FLUX.1-dev's transformer "11.9 B" (diffusers counts 11,901,408,320); schnell lacks the
    # guidance embedder (256*3072 + 3072 + 3072*3072 + 3072 = 10,229,760 fewer).
    assert inventory(FluxConfig(guidance_embeds=True)).param_count == 11_901_408_320
    assert inventory(FluxConfig()).param_count == 11_901_408_320 - 10_229_760
    assert inventory(SANA_PRESETS["sana-1.5-1.6b"]).param_count == 1_604_641_952
    assert inventory(ZIMAGE_PRESETS["z-image-turbo"]).param_count == 6_154_908_736
    assert inventory(T5_XXL_FLUX).param_count == 4_762_310_656  # T5 v1.1 XXL encoder
    assert inventory(CLIP_L_FLUX).param_count == 123_060_480  # CLIP ViT-L/14 text model
    assert inventory(FLUX_VAE_CONFIG).param_count == 83_819_683


def test_unknown_config_is_refused():
    with pytest.raises(TypeError, match="no parameter inventory for dict"):
        inventory({"num_layers": 2})


def test_sana_and_zimage_parts_match_their_reference_modules():
    """Gemma-2-2B, Qwen3-4B and SANA's DC-AE decoder: the counts of transformers' and
    diffusers' own modules built with the same configs (on the meta device: no weights)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    diffusers = pytest.importorskip("diffusers")
    from pqjax.models import dcae, gemma2, qwen3

    with torch.device("meta"):
        refs = [
            (gemma2.GEMMA2_2B, transformers.Gemma2Model(transformers.Gemma2Config(
                **{k: v for k, v in gemma2.write_config(gemma2.GEMMA2_2B).items()
                   if k != "architectures"}))),
            (qwen3.QWEN3_4B, transformers.Qwen3Model(transformers.Qwen3Config(
                **{k: v for k, v in qwen3.write_config(qwen3.QWEN3_4B).items()
                   if k != "architectures"}))),
            (dcae.SANA_DCAE, diffusers.AutoencoderDC(
                **{k: v for k, v in dcae.write_config(dcae.SANA_DCAE).items()
                   if k != "_class_name"}).decoder),
        ]
    for config, module in refs:
        assert inventory(config).param_count == sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("cls, config", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_module_inventory_is_the_builders(cls, config):
    """What a family without a builder gets (read off its abstract module) is what the
    builders compute from the config."""
    from pqjax.inventory import module_inventory

    model = nnx.eval_shape(lambda: cls(config, dtype=jnp.bfloat16, rngs=OneKey()))
    got, want = module_inventory(model), inventory(config)
    assert got.params == want.params and got.linears == want.linears
