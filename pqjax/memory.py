"""Memory estimates from the models' configs: no weights, no device memory, no module built.

    est = pqjax.estimate_memory("flux-dev", pqjax.QuantConfig(weights="nvfp4", acts="nvfp4"))
    print(est.to_markdown())

Sizes are exact for what is stored: the parameters come from `pqjax.inventory` (equal, path for
path, to the abstract modules), every Linear the config quantizes is sized by abstract
evaluation of the format's own `quantize` (codes, block scales, global scale), its bias and
every other parameter stay 16-bit. Peaks are estimates from each family's memory model (its
token counts and widths, `Family.memory`) under the assumptions listed with them.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pqjax.inventory import Inventory, inventory
from pqjax.models.family import FamilyMemory, families, family_of_preset
from pqjax.quantize import QuantConfig, is_skipped

GiB = 2**30


def _presets() -> dict[str, dict[str, Any]]:
    """Each preset's component configs, from the family records (the module classes are in
    `pqjax.inventory`)."""
    return {name: parts for fam in families() for name, parts in fam.presets().items()}


def preset_names() -> list[str]:
    return sorted(_presets())


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


def deferred_linears(inv: Inventory, patterns: tuple[str, ...]) -> dict[str, tuple]:
    """The Linears of `inv` that match the family's `cross_block_layers` globs (what the
    engine's model stage quantizes besides the layers outside the blocks)."""
    return {p: v for p, v in inv.linears.items()
            if any(fnmatch.fnmatchcase(p, pat) for pat in patterns)}


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
    text_tokens: the caption length (default: the family's, `Family.memory`). Peaks assume
    weights in bf16; for quantization, the engine's block-by-block path (one full-precision
    block resident, finished blocks on disk, then the model stage with the layers of the
    sites that span blocks: FLUX's AdaLN linears, `Family.cross_block_layers`) or the whole
    model in memory; for inference, text encoders run once and are released before sampling.
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
    record = family_of_preset(name)
    fam = record.memory(tcfg, name)
    img_tokens = fam.image_tokens(height, width)
    txt = text_tokens if text_tokens is not None else fam.text_tokens
    act = _block_peak_bytes(fam, img_tokens, txt, batch, flash_attention)
    block_sizes = [n for lst in record.block_lists for n in tinv.counts_by_item(lst).values()]
    biggest_block = 2 * max(block_sizes, default=0)
    in_blocks = sum(block_sizes)
    shell = 2 * (tinv.param_count - in_blocks)  # embedders and final layers, always resident
    cache_tokens = img_tokens + txt
    cache_batch = calib_batch * cache_tokens * fam.dim * 2 * 2  # a batch of block inputs, outputs
    deferred = deferred_linears(tinv, record.cross_block_layers)
    deferred_fp = sum(2 * d_in * d_out for d_in, d_out, _ in deferred.values())
    wfmt = config.weight_format()
    deferred_q = sum(
        (2 * d_in * d_out if wfmt is None else quantized_weight_bytes(d_out, d_in, wfmt))
        + (2 * d_out if bias else 0) for d_in, d_out, bias in deferred.values())
    vae = components.get("vae", {}).get("bf16_bytes", 0)
    encoders = sum(c["bf16_bytes"] for k, c in components.items() if k.startswith("text"))
    # the FLUX VAE decoder: three full-resolution 128-channel maps
    vae_act = batch * 3 * 128 * height * width * 2 if "vae" in components else 0
    # block by block (pqjax.engine.stream_quantize): finished blocks go to disk; a block stage
    # holds one full-precision block, its quantized copy, the calibration cache and one
    # block's activations; the model stage holds every layer it quantizes (the readers of the
    # sites that span blocks) in 16-bit and quantized; the result is assembled last.
    block_stage = biggest_block + biggest_block // 3 + cache_batch + act
    model_stage = deferred_fp + deferred_q
    peaks = {
        "inference (quantized transformer + VAE, encoders released)": (
            tr["quantized_bytes"] + vae + max(act, vae_act)
        )
        / GiB,
        "inference (bf16 transformer + VAE, encoders released)": (
            tr["bf16_bytes"] + vae + max(act, vae_act)
        )
        / GiB,
        "block-by-block quantization (engine, streamed)": (
            shell + max(block_stage, model_stage, tr["quantized_bytes"] - shell)
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
