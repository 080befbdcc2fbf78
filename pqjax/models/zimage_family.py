"""The Z-Image family record; its sites, for the noise refiner, the context refiner and the
main layers.

Per block: attention_norm1 -> q/k/v (with the scale_msa chunk of the block's AdaLN linear, if
it has one), the attention output within heads -> to_out, ffn_norm1 -> w1/w3 (scale_mlp chunk),
and the SwiGLU hidden -> w2 (one order on w1's and w3's output columns). The sandwich norms
(attention_norm2, ffn_norm2) and q/k norms sit on outputs that feed no Linear, so they are no
sites. All AdaLN linears read the same t-embedding: one more site.
"""

from __future__ import annotations

from typing import Any

from pqjax.models.family import Carry, Family, FamilyMemory, Runner, Static
from pqjax.models.sites import Site, linear_out, modulation
from pqjax.models.spec import ModelSpec
from pqjax.models.zimage import ZImageConfig, ZImageTransformer2DModel
from pqjax.models.zimage_blocks import ffn_hidden, unpatchify

BLOCK_LISTS = ("noise_refiner", "context_refiner", "layers")


def zimage_sites(model: ZImageTransformer2DModel) -> list[Site]:
    d = model.config.dim
    out: list[Site] = []
    adaln_consumers: list[str] = []
    for lst in BLOCK_LISTS:
        for i, block in enumerate(getattr(model, lst)):
            p = f"{lst}.{i}"
            attn, ff = block.attention, block.feed_forward
            mod = block.adaLN_modulation is not None
            if mod:
                adaln_consumers.append(f"{p}.adaLN_modulation.0")
            ada = f"{p}.adaLN_modulation.0"
            out.append(Site(
                f"{p}.attention_norm1", d, kind="norm", direct=True,
                consumers=tuple(f"{p}.attention.{n}" for n in ("to_q", "to_k", "to_v")),
                edits=modulation(model, ada, d, scale=0) if mod else (),
                norms=(f"{p}.attention_norm1",),
            ))
            inner = attn.heads * attn.head_dim
            out.append(Site(
                f"{p}.attention.out", inner, kind="attn_out",
                consumers=(f"{p}.attention.to_out.0",),
                edits=linear_out(model, f"{p}.attention.to_v"),
                segments=((inner, attn.head_dim),),
            ))
            out.append(Site(
                f"{p}.ffn_norm1", d, kind="norm", direct=True,
                consumers=(f"{p}.feed_forward.w1", f"{p}.feed_forward.w3"),
                edits=modulation(model, ada, d, scale=2) if mod else (),
                norms=(f"{p}.ffn_norm1",),
            ))
            # silu(w1 x) * (w3 x) is linear in w3 x only: w1's columns take the order, no scale.
            out.append(Site(
                f"{p}.feed_forward.hidden", ff.w2.in_features, kind="ffn_hidden",
                consumers=(f"{p}.feed_forward.w2",),
                edits=linear_out(model, f"{p}.feed_forward.w1", role="perm_only")
                + linear_out(model, f"{p}.feed_forward.w3"),
            ))
    # The AdaLN linears read t_embedder's output (the final layer through a SiLU).
    finals = [f"all_final_layer.{k}.adaLN_modulation.1" for k in model.all_final_layer]
    out.append(Site(
        "adaln", model.config.adaln_dim, kind="free", scalable=False, per_image=True,
        consumers=tuple(adaln_consumers + finals),
        edits=linear_out(model, "t_embedder.mlp.2"),
    ))
    return out


KEEP_16BIT = (
    ("t_embedder.*", "the timestep MLP: the AdaLN linears of every block read it"),
    ("cap_embedder.*", "projects the Qwen3 tokens into the stream once"),
    ("all_x_embedder.*", "the first layer: it reads the raw latent patches"),
    ("all_final_layer.*", "the final AdaLN and projection: their error is the velocity's"),
)


def zimage_embed(model: ZImageTransformer2DModel, latents: Any, timestep: Any, cap_feats: Any,
                 cap_lens: Any = None, patch_size: int = 2, f_patch_size: int = 1) -> Carry:
    """`forward_batch`'s arguments (the calibration batches' keywords) -> what the refiners
    read, with the sizes the final layer needs."""
    p, pf = patch_size, f_patch_size
    args = model.batch_tokens(latents, timestep, cap_feats, cap_lens, patch_size=p,
                              f_patch_size=pf)
    carry = model.embed_tokens(*args, patch_size=p, f_patch_size=pf)
    return {**carry, "sizes": Static((args[0].shape[1], tuple(latents.shape[2:]), p, pf))}


def zimage_block(block: Any, list_name: str, carry: Carry) -> Carry:
    if list_name == "noise_refiner":
        return {**carry, "x": block(carry["x"], carry["x_mask"], carry["x_rope"], carry["adaln"])}
    if list_name == "context_refiner":
        return {**carry, "cap": block(carry["cap"], carry["cap_mask"], carry["cap_rope"])}
    return {**carry, "u": block(carry["u"], carry["mask"], carry["rope"], carry["adaln"])}


def zimage_enter(list_name: str, carry: Carry) -> Carry:
    """Before the main layers, image and caption tokens become one sequence."""
    if list_name != "layers":
        return carry
    return {**ZImageTransformer2DModel.join(carry), "sizes": carry["sizes"]}


def zimage_head(model: ZImageTransformer2DModel, carry: Carry) -> Any:
    n_x, size, p, pf = carry["sizes"].value
    return unpatchify(model.final(carry["u"], carry["adaln"], n_x, p, pf), size, p, pf)


def zimage_memory(c: ZImageConfig, preset: str) -> FamilyMemory:
    hidden = ffn_hidden(c.dim)
    return FamilyMemory(
        c.dim, c.n_heads, 8 * c.all_patch_size[0], 512, 2 * hidden, True, True,
        f"FLUX VAE 8x, patch {c.all_patch_size[0]}; Qwen3 tokens in one sequence; "
        f"SwiGLU {hidden} (w1, w3 both live)",
    )


def zimage_presets() -> dict[str, dict[str, Any]]:
    from pqjax.models.qwen3 import QWEN3_4B
    from pqjax.models.vae import FLUX_VAE_CONFIG
    from pqjax.models.zimage import PRESETS

    return {"z-image-turbo": {"transformer": PRESETS["z-image-turbo"], "text_encoder": QWEN3_4B,
                              "vae": FLUX_VAE_CONFIG}}


# diffusers' checkpoints: module names mirror diffusers' (`all_x_embedder.2-1` is an nnx.Dict
# entry, the pad tokens raw parameters), so no key renames are needed
CHECKPOINT = ModelSpec(
    "ZImageTransformer2DModel", ZImageTransformer2DModel, ZImageConfig,
    block_counts=(("layers", "n_layers"), ("noise_refiner", "n_refiner_layers"),
                  ("context_refiner", "n_refiner_layers")),
)

FAMILY = Family(
    name="zimage",
    model_class=ZImageTransformer2DModel,
    config_class=ZImageConfig,
    checkpoints=(CHECKPOINT,),
    pipelines=(("ZImagePipeline", "pqjax.pipelines.zimage_pipeline:load_zimage"),),
    components=(("transformer", "ZImageTransformer2DModel"), ("text_encoder", "Qwen3Model"),
                ("vae", "AutoencoderKL")),
    sites=zimage_sites,
    keep_16bit=KEEP_16BIT,
    block_lists=BLOCK_LISTS,
    memory=zimage_memory,
    presets=zimage_presets,
    runner=Runner(embed=zimage_embed, block=zimage_block, head=zimage_head, enter=zimage_enter),
    cross_block_layers=("noise_refiner.*.adaLN_modulation.0", "layers.*.adaLN_modulation.0",
                        "all_final_layer.*.adaLN_modulation.1"),
    saved_parts=(("ZImageTextToImage", "pqjax.pipelines.zimage_pipeline:ZImageTextToImage"),),
)
