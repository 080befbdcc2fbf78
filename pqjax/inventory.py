"""Parameter inventories computed from a model's config alone: no module is built.

    inv = inventory(FluxConfig(guidance_embeds=True))     # FLUX.1-dev's transformer
    inv.param_count                                       # 11_901_408_320
    inv.params["x_embedder.kernel"]                       # (64, 3072)
    inv.linears["transformer_blocks.0.attn.to_q"]         # (3072, 3072, True): d_in, d_out, bias

`nnx.eval_shape` of a full-size model traces every initializer and takes seconds (FLUX.1-dev's
transformer about 20 s on 2 CPU cores); these functions list the same parameters in about a
millisecond, so `estimate_memory` answers at once. Each mirrors its module's constructor (a
model change must change its inventory too): tests/test_inventory.py holds them equal, path
for path and shape for shape, to the abstract modules on small configs, and the full presets
to their released parameter counts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from pqjax.models.zimage_blocks import ffn_hidden


@dataclasses.dataclass
class Inventory:
    """params: {dotted parameter path: shape}; linears: {dotted Linear path: (d_in, d_out,
    has_bias)}, every `Linear` (and `PointwiseConv`) module, whose parameters are in params."""

    params: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    linears: dict[str, tuple[int, int, bool]] = dataclasses.field(default_factory=dict)

    @property
    def param_count(self) -> int:
        return sum(math.prod(s) for s in self.params.values())

    def count_under(self, prefix: str) -> int:
        """Parameters under the module path `prefix` (e.g. one block)."""
        return sum(math.prod(s) for p, s in self.params.items() if p.startswith(prefix + "."))

    def counts_by_item(self, module_list: str) -> dict[str, int]:
        """{"list.i": parameters} for each item of the module list `module_list` (one pass)."""
        out: dict[str, int] = {}
        head = module_list + "."
        for p, s in self.params.items():
            if p.startswith(head):
                key = head + p[len(head):].split(".", 1)[0]
                out[key] = out.get(key, 0) + math.prod(s)
        return out

    def param(self, path: str, *shape: int) -> None:
        self.params[path] = tuple(shape)

    def linear(self, path: str, d_in: int, d_out: int, bias: bool = True) -> None:
        self.linears[path] = (d_in, d_out, bias)
        self.param(f"{path}.kernel", d_in, d_out)
        if bias:
            self.param(f"{path}.bias", d_out)

    def norm(self, path: str, dim: int, bias: bool = False) -> None:
        """An affine LayerNorm (bias=True), RMSNorm or GroupNorm; non-affine norms hold nothing."""
        self.param(f"{path}.scale", dim)
        if bias:
            self.param(f"{path}.bias", dim)

    def conv(self, path: str, c_in: int, c_out: int, k: int, groups: int = 1) -> None:
        self.param(f"{path}.kernel", k, k, c_in // groups, c_out)
        self.param(f"{path}.bias", c_out)


# ---- FLUX.1 (pqjax/models/flux.py) -----------------------------------------------------------


def flux(c: Any) -> Inventory:
    inv = Inventory()
    dim, hd = c.inner_dim, c.attention_head_dim
    t = "time_text_embed"
    embedders = ["timestep_embedder"] + (["guidance_embedder"] if c.guidance_embeds else [])
    for name in embedders:
        inv.linear(f"{t}.{name}.linear_1", 256, dim)
        inv.linear(f"{t}.{name}.linear_2", dim, dim)
    inv.linear(f"{t}.text_embedder.linear_1", c.pooled_projection_dim, dim)
    inv.linear(f"{t}.text_embedder.linear_2", dim, dim)
    inv.linear("context_embedder", c.joint_attention_dim, dim)
    inv.linear("x_embedder", c.in_channels, dim)

    def attention(p: str, joint: bool) -> None:
        for n in ("norm_q", "norm_k") + (("norm_added_q", "norm_added_k") if joint else ()):
            inv.norm(f"{p}.{n}", hd)
        for n in ("to_q", "to_k", "to_v") + (("add_q_proj", "add_k_proj", "add_v_proj") if joint
                                             else ()):
            inv.linear(f"{p}.{n}", dim, dim)
        if joint:
            inv.linear(f"{p}.to_out.0", dim, dim)
            inv.linear(f"{p}.to_add_out", dim, dim)

    for i in range(c.num_layers):
        p = f"transformer_blocks.{i}"
        inv.linear(f"{p}.norm1.linear", dim, 6 * dim)
        inv.linear(f"{p}.norm1_context.linear", dim, 6 * dim)
        attention(f"{p}.attn", joint=True)
        for ff in ("ff", "ff_context"):
            inv.linear(f"{p}.{ff}.net.0.proj", dim, 4 * dim)
            inv.linear(f"{p}.{ff}.net.2", 4 * dim, dim)
    for i in range(c.num_single_layers):
        p = f"single_transformer_blocks.{i}"
        inv.linear(f"{p}.norm.linear", dim, 3 * dim)
        inv.linear(f"{p}.proj_mlp", dim, 4 * dim)
        inv.linear(f"{p}.proj_out", 5 * dim, dim)
        attention(f"{p}.attn", joint=False)
    inv.linear("norm_out.linear", dim, 2 * dim)
    inv.linear("proj_out", dim, c.patch_size**2 * (c.out_channels or c.in_channels))
    return inv


# ---- SANA (pqjax/models/sana.py, sana_blocks.py) ---------------------------------------------


def sana(c: Any) -> Inventory:
    inv = Inventory()
    dim = c.inner_dim
    inv.conv("patch_embed.proj", c.in_channels, dim, c.patch_size)
    if c.guidance_embeds:
        for name in ("timestep_embedder", "guidance_embedder"):
            inv.linear(f"time_embed.{name}.linear_1", 256, dim)
            inv.linear(f"time_embed.{name}.linear_2", dim, dim)
    else:
        inv.linear("time_embed.emb.timestep_embedder.linear_1", 256, dim)
        inv.linear("time_embed.emb.timestep_embedder.linear_2", dim, dim)
    inv.linear("time_embed.linear", dim, 6 * dim)
    inv.linear("caption_projection.linear_1", c.caption_channels, dim)
    inv.linear("caption_projection.linear_2", dim, dim)
    inv.norm("caption_norm", dim)

    def attention(p: str, context_dim: int, heads: int, head_dim: int, bias: bool) -> None:
        inner = heads * head_dim
        if c.qk_norm is not None:
            inv.norm(f"{p}.norm_q", inner)
            inv.norm(f"{p}.norm_k", inner)
        inv.linear(f"{p}.to_q", dim, inner, bias)
        inv.linear(f"{p}.to_k", context_dim, inner, bias)
        inv.linear(f"{p}.to_v", context_dim, inner, bias)
        inv.linear(f"{p}.to_out.0", inner, dim)

    hidden = int(c.mlp_ratio * dim)
    for i in range(c.num_layers):
        p = f"transformer_blocks.{i}"
        attention(f"{p}.attn1", dim, c.num_attention_heads, c.attention_head_dim,
                  c.attention_bias)
        if c.norm_elementwise_affine:
            inv.norm(f"{p}.norm2", dim, bias=True)
        attention(f"{p}.attn2", c.cross_attention_dim, c.num_cross_attention_heads,
                  c.cross_attention_head_dim, True)
        inv.linear(f"{p}.ff.conv_inverted", dim, 2 * hidden)
        inv.conv(f"{p}.ff.conv_depth", 2 * hidden, 2 * hidden, 3, groups=2 * hidden)
        inv.linear(f"{p}.ff.conv_point", hidden, dim, bias=False)
        inv.param(f"{p}.scale_shift_table", 6, dim)
    inv.param("scale_shift_table", 2, dim)
    inv.linear("proj_out", dim, c.patch_size**2 * (c.out_channels or c.in_channels))
    return inv


# ---- Z-Image (pqjax/models/zimage.py, zimage_blocks.py) --------------------------------------

ZIMAGE_FREQ_DIM, ZIMAGE_T_MID, ZIMAGE_ADALN_MAX = 256, 1024, 256


def zimage(c: Any) -> Inventory:
    inv = Inventory()
    dim, adaln = c.dim, min(c.dim, ZIMAGE_ADALN_MAX)
    hidden = ffn_hidden(dim)

    def block(p: str, modulation: bool) -> None:
        a = f"{p}.attention"
        for n in ("to_q", "to_k", "to_v"):
            inv.linear(f"{a}.{n}", dim, dim, bias=False)
        if c.qk_norm:
            inv.norm(f"{a}.norm_q", dim // c.n_heads)
            inv.norm(f"{a}.norm_k", dim // c.n_heads)
        inv.linear(f"{a}.to_out.0", dim, dim, bias=False)
        inv.linear(f"{p}.feed_forward.w1", dim, hidden, bias=False)
        inv.linear(f"{p}.feed_forward.w2", hidden, dim, bias=False)
        inv.linear(f"{p}.feed_forward.w3", dim, hidden, bias=False)
        for n in ("attention_norm1", "ffn_norm1", "attention_norm2", "ffn_norm2"):
            inv.norm(f"{p}.{n}", dim)
        if modulation:
            inv.linear(f"{p}.adaLN_modulation.0", adaln, 4 * dim)

    for p, f in zip(c.all_patch_size, c.all_f_patch_size):
        inv.linear(f"all_x_embedder.{p}-{f}", f * p * p * c.in_channels, dim)
        inv.linear(f"all_final_layer.{p}-{f}.linear", dim, p * p * f * c.in_channels)
        inv.linear(f"all_final_layer.{p}-{f}.adaLN_modulation.1", adaln, dim)
    for i in range(c.n_refiner_layers):
        block(f"noise_refiner.{i}", True)
    for i in range(c.n_refiner_layers):
        block(f"context_refiner.{i}", False)
    inv.linear("t_embedder.mlp.0", ZIMAGE_FREQ_DIM, ZIMAGE_T_MID)
    inv.linear("t_embedder.mlp.2", ZIMAGE_T_MID, adaln)
    inv.norm("cap_embedder.0", c.cap_feat_dim)
    inv.linear("cap_embedder.1", c.cap_feat_dim, dim)
    inv.param("x_pad_token", 1, dim)
    inv.param("cap_pad_token", 1, dim)
    for i in range(c.n_layers):
        block(f"layers.{i}", True)
    return inv


# ---- text encoders and the VAE (pqjax/models/t5.py, clip.py, vae.py, vae_blocks.py) ---------


def t5_encoder(c: Any) -> Inventory:
    inv = Inventory()
    d, inner = c.d_model, c.num_heads * c.d_kv
    inv.param("shared.embedding", c.vocab_size, d)
    for i in range(c.num_layers):
        p = f"encoder.block.{i}.layer"
        for n in ("q", "k", "v"):
            inv.linear(f"{p}.0.SelfAttention.{n}", d, inner, bias=False)
        inv.linear(f"{p}.0.SelfAttention.o", inner, d, bias=False)
        if i == 0:
            inv.param(f"{p}.0.SelfAttention.relative_attention_bias.embedding",
                      c.relative_attention_num_buckets, c.num_heads)
        inv.norm(f"{p}.0.layer_norm", d)
        ins = ("wi_0", "wi_1") if c.is_gated_act else ("wi",)
        for n in ins:
            inv.linear(f"{p}.1.DenseReluDense.{n}", d, c.d_ff, bias=False)
        inv.linear(f"{p}.1.DenseReluDense.wo", c.d_ff, d, bias=False)
        inv.norm(f"{p}.1.layer_norm", d)
    inv.norm("encoder.final_layer_norm", d)
    return inv


def clip_text(c: Any) -> Inventory:
    inv = Inventory()
    d, t = c.hidden_size, "text_model"
    inv.param(f"{t}.embeddings.token_embedding.embedding", c.vocab_size, d)
    inv.param(f"{t}.embeddings.position_embedding.embedding", c.max_position_embeddings, d)
    for i in range(c.num_hidden_layers):
        p = f"{t}.encoder.layers.{i}"
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            inv.linear(f"{p}.self_attn.{n}", d, d)
        inv.norm(f"{p}.layer_norm1", d, bias=True)
        inv.linear(f"{p}.mlp.fc1", d, c.intermediate_size)
        inv.linear(f"{p}.mlp.fc2", c.intermediate_size, d)
        inv.norm(f"{p}.layer_norm2", d, bias=True)
    inv.norm(f"{t}.final_layer_norm", d, bias=True)
    return inv


def vae(c: Any) -> Inventory:
    inv = Inventory()

    def resnet(p: str, c_in: int, c_out: int) -> None:
        inv.norm(f"{p}.norm1", c_in, bias=True)
        inv.conv(f"{p}.conv1", c_in, c_out, 3)
        inv.norm(f"{p}.norm2", c_out, bias=True)
        inv.conv(f"{p}.conv2", c_out, c_out, 3)
        if c_in != c_out:
            inv.linear(f"{p}.conv_shortcut", c_in, c_out)

    def mid(p: str, ch: int) -> None:
        resnet(f"{p}.resnets.0", ch, ch)
        resnet(f"{p}.resnets.1", ch, ch)
        if c.mid_block_add_attention:
            a = f"{p}.attentions.0"
            inv.norm(f"{a}.group_norm", ch, bias=True)
            for n in ("to_q", "to_k", "to_v", "to_out.0"):
                inv.linear(f"{a}.{n}", ch, ch)

    ch, lat = c.block_out_channels, c.latent_channels
    inv.conv("encoder.conv_in", c.in_channels, ch[0], 3)
    for i in range(len(ch)):
        for j in range(c.layers_per_block):
            c_in = ch[max(i - 1, 0)] if j == 0 else ch[i]
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", c_in, ch[i])
        if i < len(ch) - 1:
            inv.conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", ch[i], ch[i], 3)
    mid("encoder.mid_block", ch[-1])
    inv.norm("encoder.conv_norm_out", ch[-1], bias=True)
    inv.conv("encoder.conv_out", ch[-1], 2 * lat, 3)
    rev = tuple(reversed(ch))
    inv.conv("decoder.conv_in", lat, rev[0], 3)
    mid("decoder.mid_block", rev[0])
    for i in range(len(rev)):
        for j in range(c.layers_per_block + 1):
            c_in = rev[max(i - 1, 0)] if j == 0 else rev[i]
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", c_in, rev[i])
        if i < len(rev) - 1:
            inv.conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", rev[i], rev[i], 3)
    inv.norm("decoder.conv_norm_out", rev[-1], bias=True)
    inv.conv("decoder.conv_out", rev[-1], c.out_channels, 3)
    if c.use_quant_conv:
        inv.linear("quant_conv", 2 * lat, 2 * lat)
    if c.use_post_quant_conv:
        inv.linear("post_quant_conv", lat, lat)
    return inv


def _builders() -> dict[type, Callable[[Any], Inventory]]:
    from pqjax import inventory_lm
    from pqjax.models.clip import CLIPTextConfig
    from pqjax.models.dcae import AutoencoderDCConfig
    from pqjax.models.flux import FluxConfig
    from pqjax.models.gemma2 import Gemma2Config
    from pqjax.models.qwen3 import Qwen3Config
    from pqjax.models.sana import SanaConfig
    from pqjax.models.t5 import T5Config
    from pqjax.models.vae import AutoencoderKLConfig
    from pqjax.models.zimage import ZImageConfig

    return {
        Gemma2Config: lambda c: inventory_lm.gemma2(c, Inventory()),
        Qwen3Config: lambda c: inventory_lm.qwen3(c, Inventory()),
        AutoencoderDCConfig: lambda c: inventory_lm.dcae_decoder(c, Inventory()),
        FluxConfig: flux,
        SanaConfig: sana,
        ZImageConfig: zimage,
        T5Config: t5_encoder,
        CLIPTextConfig: clip_text,
        AutoencoderKLConfig: vae,
    }


def module_inventory(model: Any) -> Inventory:
    """The inventory of a built (or abstract, `nnx.eval_shape`) module: what the builders
    above compute from configs alone, read off the module itself."""
    from flax import nnx

    from pqjax.calibrate import linears

    inv = Inventory()
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        inv.params[".".join(map(str, path))] = tuple(v.get_value().shape)
    for path, lin in linears(model):
        inv.linears[path] = (lin.in_features, lin.out_features, lin.bias is not None)
    return inv


def inventory(config: Any) -> Inventory:
    """The parameters of the module that `config` (a model config dataclass) builds: from the
    config alone where a builder above knows it (milliseconds), else, for a transformer family
    record's config, from its abstract module (seconds at full size; a new family needs no
    builder, only its record)."""
    builders = _builders()
    if type(config) in builders:
        return builders[type(config)](config)
    from pqjax.models.family import families

    for fam in families():
        if type(config) is fam.config_class:
            from flax import nnx

            return module_inventory(
                nnx.eval_shape(lambda f=fam: f.model_class(config, rngs=nnx.Rngs(0))))
    raise TypeError(
        f"no parameter inventory for {type(config).__name__}; known: "
        f"{sorted(t.__name__ for t in builders)} and the family records' configs"
    )
