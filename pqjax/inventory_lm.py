"""Parameter inventories of SANA's and Z-Image's other parts: Gemma-2, Qwen3, the DC-AE decoder.

Same contract as `pqjax.inventory`, which dispatches here by config type and passes in an empty
`Inventory` to fill (so this module imports nothing from it): every parameter path and shape the
module builds, from its config alone.
"""

from __future__ import annotations

from typing import Any


def _decoder_lm(c: Any, inv: Any, *, gemma: bool) -> Any:
    d, hd, ff = c.hidden_size, c.head_dim, c.intermediate_size
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    inv.param("embed_tokens.embedding", c.vocab_size, d)
    for i in range(c.num_hidden_layers):
        p = f"layers.{i}"
        for name, width in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            inv.linear(f"{p}.self_attn.{name}", d, width, bias=c.attention_bias)
        inv.linear(f"{p}.self_attn.o_proj", q, d, bias=c.attention_bias)
        if not gemma:
            inv.param(f"{p}.self_attn.q_norm.weight", hd)
            inv.param(f"{p}.self_attn.k_norm.weight", hd)
        for name in ("gate_proj", "up_proj"):
            inv.linear(f"{p}.mlp.{name}", d, ff, bias=False)
        inv.linear(f"{p}.mlp.down_proj", ff, d, bias=False)
        norms = ("input_layernorm", "post_attention_layernorm")
        if gemma:
            norms += ("pre_feedforward_layernorm", "post_feedforward_layernorm")
        for name in norms:
            inv.param(f"{p}.{name}.weight", d)
    inv.param("norm.weight", d)
    return inv


def gemma2(c: Any, inv: Any) -> Any:
    return _decoder_lm(c, inv, gemma=True)


def qwen3(c: Any, inv: Any) -> Any:
    return _decoder_lm(c, inv, gemma=False)


def dcae_decoder(c: Any, inv: Any) -> Any:
    """`pqjax.models.dcae.AutoencoderDC`: the decoder only (sampling never encodes)."""
    chans = c.decoder_block_out_channels
    kinds = c.per_block(c.decoder_block_types)

    def rms(path: str, ch: int) -> None:
        inv.param(f"{path}.weight", ch)
        inv.param(f"{path}.bias", ch)

    def conv(path: str, c_in: int, c_out: int, k: int, groups: int = 1, bias: bool = True):
        inv.param(f"{path}.kernel", k, k, c_in // groups, c_out)
        if bias:
            inv.param(f"{path}.bias", c_out)

    inv.conv("decoder.conv_in", c.latent_channels, chans[-1], 3)
    for i, (ch, layers) in enumerate(zip(chans, c.decoder_layers_per_block)):
        p, j = f"decoder.up_blocks.{i}", 0
        if i < len(chans) - 1 and layers > 0:
            out = ch if c.upsample_block_type == "interpolate" else 4 * ch
            inv.conv(f"{p}.0.conv", chans[i + 1], out, 3)
            j = 1
        for k in range(j, j + layers):
            b = f"{p}.{k}"
            if kinds[i] == "ResBlock":
                inv.conv(f"{b}.conv1", ch, ch, 3)
                conv(f"{b}.conv2", ch, ch, 3, bias=False)
                rms(f"{b}.norm", ch)
                continue
            heads = ch // c.attention_head_dim
            inner = heads * c.attention_head_dim
            scales = tuple(c.decoder_qkv_multiscales[i])
            for name in ("to_q", "to_k", "to_v"):
                inv.linear(f"{b}.attn.{name}", ch, inner, bias=False)
            for s, ks in enumerate(scales):
                m = f"{b}.attn.to_qkv_multiscale.{s}"
                conv(f"{m}.proj_in", 3 * inner, 3 * inner, ks, groups=3 * inner, bias=False)
                conv(f"{m}.proj_out", 3 * inner, 3 * inner, 1, groups=3 * heads, bias=False)
            inv.linear(f"{b}.attn.to_out", inner * (1 + len(scales)), ch, bias=False)
            rms(f"{b}.attn.norm_out", ch)
            hidden = 4 * ch
            inv.linear(f"{b}.conv_out.conv_inverted", ch, 2 * hidden)
            inv.conv(f"{b}.conv_out.conv_depth", 2 * hidden, 2 * hidden, 3, groups=2 * hidden)
            inv.linear(f"{b}.conv_out.conv_point", hidden, ch, bias=False)
            rms(f"{b}.conv_out.norm", ch)
    rms("decoder.norm_out", chans[0])
    inv.conv("decoder.conv_out", chans[0], c.in_channels, 3)
    return inv
