"""The SANA family record (diffusers `SanaTransformer2DModel`, SANA-1.5) and its sites.

Per block `transformer_blocks.i` (d = inner_dim, h = the Mix-FFN hidden width):
- `norm1` -> `attn1.to_q, to_k, to_v`: norm1 is a non-affine LayerNorm with AdaLN-single
  modulation `table[0:2] + temb chunks 0:2`. The block's `scale_shift_table` rows 0 (shift)
  and 1 (scale) are permuted offline; the shared `time_embed` vector cannot be (every block
  reads it), so the block gathers its chunks with `norm1.perm` at run time (`(b, d)` each).
- `attn1.out` -> `attn1.to_out.0`: within heads, through `attn1.to_v`'s columns (the ReLU
  linear attention is linear in v per channel).
- `attn2.out` -> `attn2.to_out.0`: within cross heads, through `attn2.to_v`'s columns.
- `norm2` -> `ff.conv_inverted` (a 1x1 conv held as a Linear): table rows 3, 4 as for norm1.
- `ff.hidden` (h channels) -> `ff.conv_point`: the GLU `value * silu(gate)` reads
  conv_depth(silu(conv_inverted(x))) split in halves at 0 and h. One order serves both halves:
  conv_inverted's columns and the depthwise conv's filters and bias at offsets 0 and h (a
  depthwise conv commutes with a channel permutation). A per-channel scale folds into the
  value half of the depthwise conv only; everything else is `perm_only`.
And once for the model:
- `caption_norm` -> every block's `attn2.to_k, attn2.to_v`: the caption RMSNorm is
  permutation-equivariant, so the order goes into `caption_projection.linear_2`'s columns and
  the norm's weight, with nothing gathered at run time.

No site: `attn2.to_q` reads the raw residual stream (diffusers' block has no norm before the
cross-attention), which only a run-time gather could permute; q/k outputs (RMSNorm across
heads) are never permuted; the final norm feeds `proj_out`, which stays 16-bit.
"""

from __future__ import annotations

from typing import Any

from pqjax.models.family import Carry, Family, FamilyMemory, Runner, Static
from pqjax.models.paths import module_at
from pqjax.models.sana import SanaConfig, SanaTransformer2DModel
from pqjax.models.sites import Edit, Site, linear_out
from pqjax.models.spec import ModelSpec

# (norm, scale_shift_table shift row, scale row, consumers relative to the block)
NORM_SITES = (
    ("norm1", 0, 1, ("attn1.to_q", "attn1.to_k", "attn1.to_v")),
    ("norm2", 3, 4, ("ff.conv_inverted",)),
)


def table_rows(table: str, shift: int, scale: int) -> tuple[Edit, ...]:
    """Edits for an AdaLN-single `scale_shift_table` `(6, d)`: the shift row and the scale row
    (used as 1 + scale)."""
    return (
        Edit(table, axis=0, index=shift),
        Edit(table, axis=0, index=scale, role="mod_scale"),
    )


def depthwise_out(
    model: SanaTransformer2DModel, path: str, offset: int, role: str
) -> tuple[Edit, ...]:
    """Edits for the site's channels placed from `offset` in a depthwise Conv2d's outputs:
    kernel HWIO `(kh, kw, 1, c)` along axis 3, and the bias `(c,)`."""
    conv = module_at(model, path)
    if conv.groups != conv.kernel.shape[3] or conv.kernel.shape[2] != 1:
        raise ValueError(f"{path} is not a depthwise conv (kernel {conv.kernel.shape})")
    edits = [Edit(f"{path}.kernel", axis=3, offset=offset, role=role)]
    if conv.bias is not None:
        edits.append(Edit(f"{path}.bias", axis=0, offset=offset, role=role))
    return tuple(edits)


def sana_sites(model: SanaTransformer2DModel) -> list[Site]:
    c = model.config
    d = c.inner_dim
    out: list[Site] = []
    for i, block in enumerate(model.transformer_blocks):
        p = f"transformer_blocks.{i}"
        for norm, shift, scale, consumers in NORM_SITES:
            out.append(Site(
                f"{p}.{norm}", d, kind="norm",
                consumers=tuple(f"{p}.{n}" for n in consumers),
                edits=table_rows(f"{p}.scale_shift_table", shift, scale),
                norms=(f"{p}.{norm}",),
                # the shared time_embed vector is part of shift and scale: no offline fold
                scalable=False,
                # norm1 feeds q/k/v through a same-dtype cast; norm2 is reshaped to an image
                direct=norm == "norm1",
            ))
        for attn in ("attn1", "attn2"):
            mod = getattr(block, attn)
            inner = mod.heads * mod.head_dim
            out.append(Site(
                f"{p}.{attn}.out", inner, kind="attn_out",
                consumers=(f"{p}.{attn}.to_out.0",),
                edits=linear_out(model, f"{p}.{attn}.to_v"),
                segments=((inner, mod.head_dim),),
            ))
        h = block.ff.hidden
        ff = f"{p}.ff"
        out.append(Site(
            f"{ff}.hidden", h, kind="ffn_hidden",
            consumers=(f"{ff}.conv_point",),
            # SiLU follows conv_inverted: its columns only move; the value half of the
            # depthwise conv feeds the GLU linearly and takes a scale.
            edits=linear_out(model, f"{ff}.conv_inverted", role="perm_only")
            + linear_out(model, f"{ff}.conv_inverted", offset=h, role="perm_only")
            + depthwise_out(model, f"{ff}.conv_depth", 0, role="linear")
            + depthwise_out(model, f"{ff}.conv_depth", h, role="perm_only"),
        ))
    out.append(Site(
        "caption_norm", d, kind="norm",
        consumers=tuple(
            f"transformer_blocks.{i}.attn2.{n}"
            for i in range(len(model.transformer_blocks))
            for n in ("to_k", "to_v")
        ),
        edits=(
            *linear_out(model, "caption_projection.linear_2", role="perm_only"),
            Edit("caption_norm.scale", axis=0),
        ),
    ))
    return out


# patch_embed (the first layer) is a convolution and norm_out has no Linear: neither is
# quantized at all.
KEEP_16BIT = (
    ("caption_projection.*", "projects the Gemma-2 tokens once; every cross-attention reads it"),
    ("time_embed.*", "the timestep MLP and AdaLN-single linear: they modulate every block"),
    ("proj_out", "the last projection: its error is the velocity's"),
)


def sana_embed(model: SanaTransformer2DModel, hidden_states: Any, encoder_hidden_states: Any,
               timestep: Any, guidance: Any = None, encoder_attention_mask: Any = None
               ) -> Carry:
    """diffusers' forward keywords -> what the blocks read; the token grid rides along."""
    x, context, bias, temb, embedded = model.embed(
        hidden_states, encoder_hidden_states, timestep, guidance, encoder_attention_mask)
    p = model.config.patch_size
    grid = (hidden_states.shape[2] // p, hidden_states.shape[3] // p)
    return {"x": x, "context": context, "bias": bias, "temb": temb, "embedded": embedded,
            "grid": Static(grid)}


def sana_block(block: Any, list_name: str, carry: Carry) -> Carry:
    hp, wp = carry["grid"].value
    return {**carry, "x": block(carry["x"], carry["context"], carry["bias"], carry["temb"],
                                hp, wp)}


def sana_head(model: SanaTransformer2DModel, carry: Carry) -> Any:
    return model.head(carry["x"], carry["embedded"], *carry["grid"].value)


def sana_memory(c: SanaConfig, preset: str) -> FamilyMemory:
    dim, hidden = c.inner_dim, int(c.mlp_ratio * c.inner_dim)
    return FamilyMemory(
        dim, c.num_attention_heads, 32 * c.patch_size, 300, 2 * hidden, False, False,
        f"DC-AE 32x, patch {c.patch_size}; 300 Gemma-2 tokens by cross-attention; linear "
        f"self-attention; Mix-FFN {c.mlp_ratio}d, its inverted conv emits 2x that (GLU)",
    )


def sana_presets() -> dict[str, dict[str, Any]]:
    from pqjax.models.dcae import SANA_DCAE
    from pqjax.models.gemma2 import GEMMA2_2B
    from pqjax.models.sana import PRESETS

    return {"sana-1.5-1.6b": {"transformer": PRESETS["sana-1.5-1.6b"], "text_encoder": GEMMA2_2B,
                              "vae": SANA_DCAE}}


# diffusers' checkpoints: module names mirror diffusers', so no key renames are needed;
# `patch_embed.pos_embed` is a non-persistent buffer there (absent from checkpoints), which the
# NNX model recomputes from the config
CHECKPOINT = ModelSpec(
    "SanaTransformer2DModel", SanaTransformer2DModel, SanaConfig,
    block_counts=(("transformer_blocks", "num_layers"),),
)

FAMILY = Family(
    name="sana",
    model_class=SanaTransformer2DModel,
    config_class=SanaConfig,
    checkpoints=(CHECKPOINT,),
    pipelines=(("SanaPipeline", "pqjax.pipelines.sana_pipeline:load_sana"),),
    components=(("transformer", "SanaTransformer2DModel"), ("text_encoder", "Gemma2Model"),
                ("vae", "AutoencoderDC")),
    sites=sana_sites,
    keep_16bit=KEEP_16BIT,
    block_lists=("transformer_blocks",),
    memory=sana_memory,
    presets=sana_presets,
    runner=Runner(embed=sana_embed, block=sana_block, head=sana_head),
    cross_block_layers=("transformer_blocks.*.attn2.to_k", "transformer_blocks.*.attn2.to_v"),
    saved_parts=(("SanaTextToImage", "pqjax.pipelines.sana_pipeline:SanaTextToImage"),),
)
