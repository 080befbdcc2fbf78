"""Memory estimates from the models' configs: no weights, no device memory, no module built.

    est = pqjax.estimate_memory("flux-dev", pqjax.QuantConfig(weights="nvfp4", acts="nvfp4"))
    print(est.to_markdown())

Sizes are exact for what is stored: the parameters come from `pqjax.inventory` (equal, path for
path, to the abstract modules), every Linear the config quantizes is sized by abstract
evaluation of the format's own `quantize` (codes, block scales, global scale), its bias and
every other parameter stay 16-bit. Peaks are estimates from each family's memory model (its
token counts and widths, `FAMILY_MEMORY`) under the assumptions listed with them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pqjax.inventory import Inventory, inventory, zimage_ffn_hidden
from pqjax.quantize import QuantConfig, is_skipped

GiB = 2**30


def _presets() -> dict[str, dict[str, Any]]:
    """Each preset's component configs (the module classes are in `pqjax.inventory`)."""
    from pqjax.models.clip import CLIP_L_FLUX
    from pqjax.models.dcae import SANA_DCAE
    from pqjax.models.flux import FluxConfig
    from pqjax.models.gemma2 import GEMMA2_2B
    from pqjax.models.qwen3 import QWEN3_4B
    from pqjax.models.sana import PRESETS as SANA
    from pqjax.models.t5 import T5_XXL_FLUX
    from pqjax.models.vae import FLUX_VAE_CONFIG
    from pqjax.models.zimage import PRESETS as ZIMAGE

    flux_parts = {
        "text_encoder": CLIP_L_FLUX,
        "text_encoder_2": T5_XXL_FLUX,
        "vae": FLUX_VAE_CONFIG,
    }
    return {
        "flux-dev": {"transformer": FluxConfig(guidance_embeds=True), **flux_parts},
        "flux-schnell": {"transformer": FluxConfig(), **flux_parts},
        "sana-1.5-1.6b": {"transformer": SANA["sana-1.5-1.6b"], "text_encoder": GEMMA2_2B,
                          "vae": SANA_DCAE},
        "z-image-turbo": {"transformer": ZIMAGE["z-image-turbo"], "text_encoder": QWEN3_4B,
                          "vae": FLUX_VAE_CONFIG},
    }


def preset_names() -> list[str]:
    return sorted(_presets())


@dataclasses.dataclass(frozen=True)
class FamilyMemory:
    """What sets a transformer family's activation memory at a resolution.

    pixels_per_token: image pixels per token along each axis (autoencoder downscale x patch);
    text_tokens: the pipeline's default caption length; mlp_live: channels per token of the
    widest feed-forward intermediate; joint: text tokens share the image tokens' sequence
    (else they enter by cross-attention); softmax_self_attention: False for linear attention
    (no token x token scores); block_lists: the module lists that hold the blocks.
    """

    dim: int
    heads: int
    pixels_per_token: int
    text_tokens: int
    mlp_live: int
    joint: bool
    softmax_self_attention: bool
    block_lists: tuple[str, ...]
    notes: str

    def image_tokens(self, height: int, width: int) -> int:
        return (height // self.pixels_per_token) * (width // self.pixels_per_token)


def _flux_memory(c: Any, name: str) -> FamilyMemory:
    dim = c.inner_dim
    return FamilyMemory(
        dim, c.num_attention_heads, 16, 512 if name == "flux-dev" else 256, 4 * dim, True, True,
        ("transformer_blocks", "single_transformer_blocks"),
        "VAE 8x, 2x2 latent patches; T5 tokens; MLP 4d",
    )


def _sana_memory(c: Any, name: str) -> FamilyMemory:
    dim, hidden = c.inner_dim, int(c.mlp_ratio * c.inner_dim)
    return FamilyMemory(
        dim, c.num_attention_heads, 32 * c.patch_size, 300, 2 * hidden, False, False,
        ("transformer_blocks",),
        f"DC-AE 32x, patch {c.patch_size}; 300 Gemma-2 tokens by cross-attention; linear "
        f"self-attention; Mix-FFN {c.mlp_ratio}d, its inverted conv emits 2x that (GLU)",
    )


def _zimage_memory(c: Any, name: str) -> FamilyMemory:
    hidden = zimage_ffn_hidden(c.dim)
    return FamilyMemory(
        c.dim, c.n_heads, 8 * c.all_patch_size[0], 512, 2 * hidden, True, True,
        ("noise_refiner", "context_refiner", "layers"),
        f"FLUX VAE 8x, patch {c.all_patch_size[0]}; Qwen3 tokens in one sequence; "
        f"SwiGLU {hidden} (w1, w3 both live)",
    )


def family_memory(name: str, config: Any) -> FamilyMemory:
    """The memory model of the preset `name`'s transformer family."""
    from pqjax.models.flux import FluxConfig
    from pqjax.models.sana import SanaConfig
    from pqjax.models.zimage import ZImageConfig

    models: dict[type, Callable[[Any, str], FamilyMemory]] = {
        FluxConfig: _flux_memory, SanaConfig: _sana_memory, ZImageConfig: _zimage_memory,
    }
    return models[type(config)](config, name)


def abstract_model(cls: type, config: Any, dtype: Any = jnp.bfloat16) -> nnx.Module:
    """The module `cls(config)` with shapes only (`nnx.eval_shape`; seconds at full size)."""
    return nnx.eval_shape(lambda: cls(config, dtype=dtype, rngs=nnx.Rngs(0)))


def param_count(model: nnx.Module) -> int:
    return int(
        sum(np.prod(v.get_value().shape) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    )


def layout_bytes(d_out: int, d_in: int, fmt: Any) -> int | None:
    """Stored bytes of a `(d_out, d_in)` weight from the format's documented layout, or None
    for a format without one here. NVFP4 / MXFP4: 4-bit codes, one 1-byte scale (E4M3 / E8M0)
    per 16 / 32 elements, NVFP4 a float32 global scale; INT-k: k-bit codes, a float16 scale
    (and for the asymmetric ones a uint8 zero point) per group; rows padded to whole groups.
    tests/test_memory_estimate.py holds it equal to `abstract_weight_bytes` for every format."""
    from pqjax.formats import IntFormat
    from pqjax.formats.fp4 import MXFP4, NVFP4

    n_pad = fmt.padded_len(d_in)
    groups = n_pad // (fmt.group_size or n_pad)
    if isinstance(fmt, (NVFP4, MXFP4)):
        per_row, extra = -(-n_pad * 4 // 8) + groups, 4 if isinstance(fmt, NVFP4) else 0
    elif isinstance(fmt, IntFormat):
        per_row = -(-n_pad * fmt.bits // 8) + 2 * groups + (0 if fmt.symmetric else groups)
        extra = 0
    else:
        return None
    return d_out * per_row + extra


@functools.lru_cache(maxsize=256)
def abstract_weight_bytes(d_out: int, d_in: int, fmt: Any) -> int:
    """Stored bytes of a `(d_out, d_in)` weight in `fmt` by abstract evaluation of its own
    `quantize` (exact for any format; a trace, tens of milliseconds to a second)."""
    qt = jax.eval_shape(lambda w: fmt.quantize(w), jax.ShapeDtypeStruct((d_out, d_in), jnp.float32))
    return int(sum(np.prod(a.shape) * np.dtype(a.dtype).itemsize for a in qt.leaves()))


def quantized_weight_bytes(d_out: int, d_in: int, fmt: Any) -> int:
    """Stored bytes of a `(d_out, d_in)` weight in `fmt` (exact): the layout formula where the
    format has one, else abstract evaluation."""
    n = layout_bytes(d_out, d_in, fmt)
    return abstract_weight_bytes(d_out, d_in, fmt) if n is None else n


def transformer_bytes(inv: Inventory, config: QuantConfig) -> dict[str, Any]:
    """bf16 bytes, quantized bytes and the quantized share of a transformer's inventory."""
    params = inv.param_count
    wfmt = config.weight_format()
    quant = 0
    quant_params = 0
    n_quantized = 0
    for path, (d_in, d_out, _bias) in inv.linears.items():
        if is_skipped(path, config):
            continue
        n_quantized += 1
        quant_params += d_in * d_out
        if wfmt is None:  # activations only: the weight stays 16-bit
            quant += 2 * d_in * d_out
        else:
            quant += quantized_weight_bytes(d_out, d_in, wfmt)
        quant += 4 if config.act_format() is not None else 0  # static activation global scale
    rest = params - quant_params
    return {
        "params": params,
        "bf16_bytes": 2 * params,
        "quantized_bytes": quant + 2 * rest,
        "quantized_params": quant_params,
        "linears_quantized": n_quantized,
    }


@dataclasses.dataclass
class MemoryEstimate:
    model: str
    config: str
    components: dict[str, dict[str, Any]]
    peaks: dict[str, float]
    assumptions: dict[str, Any]

    @property
    def transformer(self) -> dict[str, Any]:
        return self.components["transformer"]

    def to_markdown(self) -> str:
        lines = [
            f"### {self.model}: {self.config}",
            "",
            "| component | params | bf16 GiB | quantized GiB | ratio |",
            "|---|---|---|---|---|",
        ]
        for name, c in self.components.items():
            q = c.get("quantized_bytes")
            ratio = f"{c['bf16_bytes'] / q:.2f}x" if q else "–"
            qs = f"{q / GiB:.2f}" if q else "(16-bit)"
            lines.append(
                f"| {name} | {c['params'] / 1e9:.3f} B | {c['bf16_bytes'] / GiB:.2f} | "
                f"{qs} | {ratio} |"
            )
        lines += ["", "| peak | GiB |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in self.peaks.items()]
        lines += ["", "Assumptions: " + "; ".join(f"{k}: {v}" for k, v in self.assumptions.items())]
        return "\n".join(lines)


def _block_peak_bytes(
    fam: FamilyMemory, img_tokens: int, txt_tokens: int, batch: int, flash: bool
) -> int:
    """Live activations inside one transformer block, bf16 (what a fused forward keeps)."""
    tokens = img_tokens + txt_tokens if fam.joint else img_tokens
    per_token = fam.dim * 6 + fam.mlp_live  # residual, norm out, q, k, v, attention out; MLP
    scores = 0
    if not flash:  # materialized f32 attention scores
        if fam.softmax_self_attention:
            scores += fam.heads * tokens * tokens * 4
        if not fam.joint:
            scores += fam.heads * img_tokens * txt_tokens * 4
    context = 0 if fam.joint else txt_tokens * fam.dim * 2 * 2  # cross-attention keys, values
    return batch * (tokens * per_token * 2 + context + scores)


def estimate_memory(
    name: str,
    config: QuantConfig | None = None,
    *,
    height: int = 1024,
    width: int = 1024,
    batch: int = 1,
    text_tokens: int | None = None,
    calib_batch: int = 8,
    flash_attention: bool = True,
) -> MemoryEstimate:
    """Bytes per component in bf16 against quantized, and peaks for quantization and inference.

    name: a preset (`preset_names()`). Computed from the configs alone (well under a second).
    text_tokens: the caption length (default: the family's, see `family_memory`). Peaks assume
    weights in bf16, block-wise streaming quantization (one full-precision block resident, the
    calibration cache on the host) or the whole model in memory, and for inference text
    encoders run once and released before sampling.
    """
    presets = _presets()
    if name not in presets:
        raise ValueError(f"no full-size preset {name!r}; known: {sorted(presets)}")
    config = config or QuantConfig()
    components: dict[str, dict[str, Any]] = {}
    tcfg = presets[name]["transformer"]
    tinv = inventory(tcfg)
    for part, cfg in presets[name].items():
        if part == "transformer":
            components[part] = transformer_bytes(tinv, config)
        else:
            n = inventory(cfg).param_count
            components[part] = {"params": n, "bf16_bytes": 2 * n}
    tr = components["transformer"]
    fam = family_memory(name, tcfg)
    img_tokens = fam.image_tokens(height, width)
    txt = text_tokens if text_tokens is not None else fam.text_tokens
    act = _block_peak_bytes(fam, img_tokens, txt, batch, flash_attention)
    block_sizes = [n for lst in fam.block_lists for n in tinv.counts_by_item(lst).values()]
    biggest_block = 2 * max(block_sizes, default=0)
    cache_tokens = img_tokens + txt
    cache_batch = calib_batch * cache_tokens * fam.dim * 2 * 2  # a batch of block inputs, outputs
    vae = components.get("vae", {}).get("bf16_bytes", 0)
    encoders = sum(c["bf16_bytes"] for k, c in components.items() if k.startswith("text"))
    # the FLUX VAE decoder: three full-resolution 128-channel maps
    vae_act = batch * 3 * 128 * height * width * 2 if "vae" in components else 0
    peaks = {
        "inference (quantized transformer + VAE, encoders released)": (
            tr["quantized_bytes"] + vae + max(act, vae_act)
        )
        / GiB,
        "inference (bf16 transformer + VAE, encoders released)": (
            tr["bf16_bytes"] + vae + max(act, vae_act)
        )
        / GiB,
        "block-wise quantization (device)": (
            tr["quantized_bytes"] + biggest_block + cache_batch + act
        )
        / GiB,
        "in-memory quantization (bf16 transformer + its quantized copy)": (
            tr["bf16_bytes"] + tr["quantized_bytes"] + cache_batch + act
        )
        / GiB,
    }
    if encoders:
        peaks["prompt encoding (text encoders, bf16)"] = encoders / GiB
    missing = [k for k, n in (("text encoders", encoders), ("autoencoder", vae)) if not n]
    assumptions = {
        "resolution": f"{height}x{width} ({img_tokens} image + {txt} text tokens)",
        "family": fam.notes,
        "batch": batch,
        "attention": "flash (no materialized scores)" if flash_attention else "materialized f32",
        "calibration": f"{calib_batch} samples per device batch, cache on the host",
        "skipped (16-bit)": ", ".join(config.skip[:5]) + ", ...",
    }
    if missing:
        assumptions["not counted"] = " and ".join(missing) + " (not in this preset yet)"
    return MemoryEstimate(name, f"{config.label} ({config.method})", components, peaks, assumptions)
