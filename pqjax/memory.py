"""Memory estimates from abstract models (`nnx.eval_shape`): no weights, no device memory.

    est = pqjax.estimate_memory("flux-dev", pqjax.QuantConfig(weights="nvfp4", acts="nvfp4"))
    print(est.to_markdown())

Sizes are exact for what is stored: every Linear the config quantizes is sized by abstract
evaluation of the format's own `quantize` (codes, block scales, global scale), its bias and every
other parameter stay 16-bit. Peaks are estimates under the assumptions listed with them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pqjax.calibrate import linears
from pqjax.quantize import QuantConfig, quantizable

GiB = 2**30


def _presets() -> dict[str, dict[str, tuple[type, Any]]]:
    from pqjax.models.clip import CLIP_L_FLUX, CLIPTextModel
    from pqjax.models.flux import FluxConfig, FluxTransformer2DModel
    from pqjax.models.sana import PRESETS as SANA
    from pqjax.models.sana import SanaTransformer2DModel
    from pqjax.models.t5 import T5_XXL_FLUX, T5EncoderModel
    from pqjax.models.vae import FLUX_VAE_CONFIG, AutoencoderKL
    from pqjax.models.zimage import PRESETS as ZIMAGE
    from pqjax.models.zimage import ZImageTransformer2DModel

    flux_parts = {
        "text_encoder": (CLIPTextModel, CLIP_L_FLUX),
        "text_encoder_2": (T5EncoderModel, T5_XXL_FLUX),
        "vae": (AutoencoderKL, FLUX_VAE_CONFIG),
    }
    return {
        "flux-dev": {
            "transformer": (FluxTransformer2DModel, FluxConfig(guidance_embeds=True)),
            **flux_parts,
        },
        "flux-schnell": {"transformer": (FluxTransformer2DModel, FluxConfig()), **flux_parts},
        "sana-1.5-1.6b": {"transformer": (SanaTransformer2DModel, SANA["sana-1.5-1.6b"])},
        "z-image-turbo": {"transformer": (ZImageTransformer2DModel, ZIMAGE["z-image-turbo"])},
    }


def preset_names() -> list[str]:
    return sorted(_presets())


def abstract_model(cls: type, config: Any, dtype: Any = jnp.bfloat16) -> nnx.Module:
    return nnx.eval_shape(lambda: cls(config, dtype=dtype, rngs=nnx.Rngs(0)))


def param_count(model: nnx.Module) -> int:
    return int(
        sum(np.prod(v.get_value().shape) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    )


@functools.lru_cache(maxsize=256)
def quantized_weight_bytes(d_out: int, d_in: int, fmt: Any) -> int:
    """Stored bytes of a `(d_out, d_in)` weight in `fmt` (abstract evaluation, exact)."""
    qt = jax.eval_shape(lambda w: fmt.quantize(w), jax.ShapeDtypeStruct((d_out, d_in), jnp.float32))
    return int(sum(np.prod(a.shape) * np.dtype(a.dtype).itemsize for a in qt.leaves()))


def transformer_bytes(model: nnx.Module, config: QuantConfig) -> dict[str, Any]:
    """bf16 bytes, quantized bytes and the quantized share of a transformer, abstractly."""
    params = param_count(model)
    targets = set(quantizable(model, config))
    wfmt = config.weight_format()
    quant = 0
    quant_params = 0
    for path, lin in linears(model):
        if path not in targets:
            continue
        n = lin.in_features * lin.out_features
        quant_params += n
        quant += quantized_weight_bytes(lin.out_features, lin.in_features, wfmt)
        quant += 4 if config.act_format() is not None else 0  # static activation global scale
    rest = params - quant_params
    return {
        "params": params,
        "bf16_bytes": 2 * params,
        "quantized_bytes": quant + 2 * rest,
        "quantized_params": quant_params,
        "linears_quantized": len(targets),
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


def _block_peak_bytes(tokens: int, dim: int, mlp: int, heads: int, batch: int, flash: bool) -> int:
    """Live activations inside one transformer block, bf16 (what a fused forward keeps)."""
    per_token = dim * 6 + mlp  # residual, norm out, q, k, v, attention out; MLP hidden
    scores = 0 if flash else heads * tokens * tokens * 4  # materialized f32 attention scores
    return batch * (tokens * per_token * 2 + scores)


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

    name: a preset (`preset_names()`). Peaks assume block-wise streaming quantization (one
    full-precision block resident, the calibration cache on the host) and, for inference, text
    encoders run once and released before sampling.
    """
    presets = _presets()
    if name not in presets:
        raise ValueError(f"no full-size preset {name!r}; known: {sorted(presets)}")
    config = config or QuantConfig()
    components: dict[str, dict[str, Any]] = {}
    models = {}
    for part, (cls, cfg) in presets[name].items():
        model = abstract_model(cls, cfg)
        models[part] = model
        if part == "transformer":
            components[part] = transformer_bytes(model, config)
        else:
            n = param_count(model)
            components[part] = {"params": n, "bf16_bytes": 2 * n}
    tr = components["transformer"]
    tcfg = presets[name]["transformer"][1]
    dim = getattr(tcfg, "inner_dim", None) or getattr(tcfg, "dim", 3072)
    img_tokens = (height // 16) * (width // 16)
    txt = text_tokens if text_tokens is not None else (512 if name == "flux-dev" else 256)
    tokens = img_tokens + txt
    heads = getattr(tcfg, "num_attention_heads", None) or getattr(tcfg, "n_heads", 24)
    act = _block_peak_bytes(tokens, dim, 4 * dim, heads, batch, flash_attention)
    biggest_block = (
        max(
            (
                param_count(b)
                for path, b in nnx.iter_graph(models["transformer"])
                if len(path) == 2 and isinstance(path[1], int)
            ),
            default=0,
        )
        * 2
    )
    cache_batch = calib_batch * tokens * dim * 2 * 2  # one batch of block inputs and outputs
    vae = components.get("vae", {}).get("bf16_bytes", 0)
    encoders = sum(c["bf16_bytes"] for k, c in components.items() if k.startswith("text"))
    vae_act = batch * 3 * 128 * height * width * 2  # three full-resolution 128-channel maps
    peaks = {
        "inference (quantized transformer + VAE, encoders released)": (
            tr["quantized_bytes"] + vae + max(act, vae_act)
        )
        / GiB,
        "inference (bf16 transformer + VAE, encoders released)": (
            tr["bf16_bytes"] + vae + max(act, vae_act)
        )
        / GiB,
        "prompt encoding (text encoders, bf16)": encoders / GiB,
        "block-wise quantization (device)": (
            tr["quantized_bytes"] + biggest_block + cache_batch + act
        )
        / GiB,
    }
    assumptions = {
        "resolution": f"{height}x{width} ({img_tokens} image + {txt} text tokens)",
        "batch": batch,
        "attention": "flash (no materialized scores)" if flash_attention else "materialized f32",
        "calibration": f"{calib_batch} samples per device batch, cache on the host",
        "skipped (16-bit)": ", ".join(config.skip[:5]) + ", ...",
    }
    return MemoryEstimate(name, f"{config.label} ({config.method})", components, peaks, assumptions)
