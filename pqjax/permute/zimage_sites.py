"""Z-Image's permutation sites, for the noise refiner, the context refiner and the main layers.

Per block: attention_norm1 -> q/k/v (with the scale_msa chunk of the block's AdaLN linear, if
it has one), the attention output within heads -> to_out, ffn_norm1 -> w1/w3 (scale_mlp chunk),
and the SwiGLU hidden -> w2 (one order on w1's and w3's output columns). The sandwich norms
(attention_norm2, ffn_norm2) and q/k norms sit on outputs that feed no Linear, so they are no
sites. All AdaLN linears read the same t-embedding: one more site.
"""

from __future__ import annotations

from pqjax.models.zimage import ZImageTransformer2DModel
from pqjax.permute.sites import Site, linear_out, modulation, register_sites

BLOCK_LISTS = ("noise_refiner", "context_refiner", "layers")


@register_sites(ZImageTransformer2DModel)
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
        "adaln", model.config.adaln_dim, kind="free", scalable=False,
        consumers=tuple(adaln_consumers + finals),
        edits=linear_out(model, "t_embedder.mlp.2"),
    ))
    return out
