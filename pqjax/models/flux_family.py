"""The FLUX.1 family record (dev, schnell, and the embedded tiny-flux-digits model).

Permutation sites (see design notes): double blocks, single blocks, and temb. q/k outputs
carry RoPE and per-head RMSNorm, so they are never permuted; the attention output is permuted
within heads through the value projection's columns.
"""

from __future__ import annotations

from typing import Any

from pqjax.models.family import Carry, Family, FamilyMemory, Runner
from pqjax.models.flux import FluxConfig, FluxTransformer2DModel
from pqjax.models.sites import Site, linear_out, modulation
from pqjax.models.spec import ModelSpec

# Per double-block stream: (AdaLN-Zero norm, q, k, v, second norm, feed-forward).
STREAMS = (
    ("norm1", "to_q", "to_k", "to_v", "norm2", "ff"),
    ("norm1_context", "add_q_proj", "add_k_proj", "add_v_proj", "norm2_context", "ff_context"),
)


def flux_sites(model: FluxTransformer2DModel) -> list[Site]:
    c = model.config
    d, hd = c.inner_dim, c.attention_head_dim
    out: list[Site] = []
    for i, block in enumerate(model.transformer_blocks):
        p = f"transformer_blocks.{i}"
        mlp = block.ff.net[0].proj.out_features
        for norm1, q, k, v, norm2, ff in STREAMS:
            out.append(Site(
                f"{p}.{norm1}", d, kind="norm", direct=True,
                consumers=(f"{p}.attn.{q}", f"{p}.attn.{k}", f"{p}.attn.{v}"),
                edits=modulation(model, f"{p}.{norm1}.linear", d, shift=0, scale=1),  # *_msa
                norms=(f"{p}.{norm1}.norm",),
            ))
            out.append(Site(
                f"{p}.{norm2}", d, kind="norm", direct=True,
                consumers=(f"{p}.{ff}.net.0.proj",),
                edits=modulation(model, f"{p}.{norm1}.linear", d, shift=3, scale=4),  # *_mlp
                norms=(f"{p}.{norm2}",),
            ))
            out.append(Site(
                f"{p}.{ff}.hidden", mlp, kind="ffn_hidden", scalable=False,  # after GELU
                consumers=(f"{p}.{ff}.net.2",),
                edits=linear_out(model, f"{p}.{ff}.net.0.proj"),
            ))
        # Joint attention mixes image and text tokens per head: one order serves both streams.
        out.append(Site(
            f"{p}.attn.out", d, kind="attn_out",
            consumers=(f"{p}.attn.to_out.0", f"{p}.attn.to_add_out"),
            edits=linear_out(model, f"{p}.attn.to_v") + linear_out(model, f"{p}.attn.add_v_proj"),
            segments=((d, hd),),
        ))
    for j, block in enumerate(model.single_transformer_blocks):
        p = f"single_transformer_blocks.{j}"
        mlp = block.mlp_hidden_dim
        out.append(Site(
            f"{p}.norm", d, kind="norm", direct=True,
            consumers=(f"{p}.attn.to_q", f"{p}.attn.to_k", f"{p}.attn.to_v", f"{p}.proj_mlp"),
            edits=modulation(model, f"{p}.norm.linear", d, shift=0, scale=1),
            norms=(f"{p}.norm.norm",),
        ))
        # proj_out reads concat(attention output, gelu(mlp hidden)): within heads, then free.
        out.append(Site(
            f"{p}.proj_out.in", d + mlp, kind="attn_out", scalable=False,  # GELU on the mlp part
            consumers=(f"{p}.proj_out",),
            edits=linear_out(model, f"{p}.attn.to_v", channels=(0, d))
            + linear_out(model, f"{p}.proj_mlp", channels=(d, d + mlp)),
            segments=((d, hd), (mlp, mlp)),
        ))
    # Every AdaLN linear reads silu(temb); temb is the sum of three embedder outputs.
    producers = ["time_text_embed.timestep_embedder.linear_2",
                 "time_text_embed.text_embedder.linear_2"]
    if c.guidance_embeds:
        producers.append("time_text_embed.guidance_embedder.linear_2")
    consumers = [f"transformer_blocks.{i}.{n}.linear"
                 for i in range(c.num_layers) for n in ("norm1", "norm1_context")]
    consumers += [f"single_transformer_blocks.{j}.norm.linear" for j in range(c.num_single_layers)]
    consumers.append("norm_out.linear")
    out.append(Site("temb", d, kind="free", scalable=False,  # SiLU before the AdaLN linears
                    per_image=True,
                    consumers=tuple(consumers),
                    edits=tuple(e for prod in producers for e in linear_out(model, prod))))
    return out


KEEP_16BIT = (
    ("x_embedder", "the first layer: it reads the raw latent patches, so its error enters "
     "every block"),
    ("context_embedder", "projects the T5 tokens into the stream once; small and sensitive"),
    ("time_text_embed.*", "timestep, guidance and pooled-text MLPs: temb modulates every block"),
    ("norm_out.*", "the final AdaLN: its modulation scales the output directly"),
    ("proj_out", "the last projection: its error is the velocity's"),
)


def flux_embed(model: FluxTransformer2DModel, **inputs: Any) -> Carry:
    """diffusers' forward keywords -> what the blocks read (x, context, temb, rope)."""
    x, context, temb, rope = model.embed(**{k: inputs.get(k) for k in EMBED_INPUTS})
    return {"x": x, "context": context, "temb": temb, "rope": rope}


EMBED_INPUTS = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep",
                "img_ids", "txt_ids", "guidance")


def flux_block(block: Any, list_name: str, carry: Carry) -> Carry:
    """A double or a single block: both map (x, context) to the next pair."""
    context, x = block(carry["x"], carry["context"], carry["temb"], carry["rope"])
    return {**carry, "x": x, "context": context}


def flux_head(model: FluxTransformer2DModel, carry: Carry) -> Any:
    return model.proj_out(model.norm_out(carry["x"], carry["temb"]))


def flux_memory(c: FluxConfig, preset: str) -> FamilyMemory:
    dim = c.inner_dim
    return FamilyMemory(
        dim, c.num_attention_heads, 16, 512 if preset == "flux-dev" else 256, 4 * dim, True, True,
        "VAE 8x, 2x2 latent patches; T5 tokens; MLP 4d",
    )


def flux_presets() -> dict[str, dict[str, Any]]:
    from pqjax.models.clip import CLIP_L_FLUX
    from pqjax.models.t5 import T5_XXL_FLUX
    from pqjax.models.vae import FLUX_VAE_CONFIG

    parts = {"text_encoder": CLIP_L_FLUX, "text_encoder_2": T5_XXL_FLUX, "vae": FLUX_VAE_CONFIG}
    return {
        "flux-dev": {"transformer": FluxConfig(guidance_embeds=True), **parts},
        "flux-schnell": {"transformer": FluxConfig(), **parts},
    }


# diffusers' checkpoints: module names mirror diffusers', so no key renames are needed
CHECKPOINT = ModelSpec(
    "FluxTransformer2DModel", FluxTransformer2DModel, FluxConfig,
    block_counts=(("transformer_blocks", "num_layers"),
                  ("single_transformer_blocks", "num_single_layers")),
)

FAMILY = Family(
    name="flux",
    model_class=FluxTransformer2DModel,
    config_class=FluxConfig,
    checkpoints=(CHECKPOINT,),
    pipelines=(
        ("FluxPipeline", "pqjax.pipelines.flux:load_flux"),
        ("TinyFluxDigitsPipeline", "pqjax.pipelines.load:load_tiny"),
    ),
    components=(("transformer", "FluxTransformer2DModel"), ("text_encoder", "CLIPTextModel"),
                ("text_encoder_2", "T5EncoderModel"), ("vae", "AutoencoderKL")),
    sites=flux_sites,
    keep_16bit=KEEP_16BIT,
    block_lists=("transformer_blocks", "single_transformer_blocks"),
    memory=flux_memory,
    presets=flux_presets,
    runner=Runner(embed=flux_embed, block=flux_block, head=flux_head),
    cross_block_layers=("transformer_blocks.*.norm1.linear",
                        "transformer_blocks.*.norm1_context.linear",
                        "single_transformer_blocks.*.norm.linear", "norm_out.linear"),
    saved_parts=(("PromptTable", "pqjax.models.text_table:PromptTable"),
                 ("IdentityDecoder", "pqjax.pipelines.pipeline:IdentityDecoder"),
                 ("FluxTextEncoders", "pqjax.pipelines.flux:FluxTextEncoders"),
                 ("VAEDecoder", "pqjax.pipelines.flux:VAEDecoder")),
)
