"""Tune, evaluate and export the trained tiny FLUX digits model (called by train_tiny_flux).

- Tuning: every (num_inference_steps, guidance) of the config's grid samples 10 per digit
  (noise seed TUNE_SEED); the classifier of `pqjax.eval.digits` scores them. Chosen: the
  best accuracy first (a margin for quantized runs to lose), then, among those, the fewest
  steps whose Fréchet distance to the real digits is within 10% of the lowest (sampling
  cost matters on CPU; closer FDs are within the noise of 100 samples), then the lowest FD.
  Guidance buys accuracy and costs diversity (FD grows with it), so the lowest guidance
  that reaches the best accuracy wins.
- Evaluation: `eval_per_digit` samples per digit with the chosen settings and a different
  noise seed (EVAL_SEED, the one `pqjax.eval.compare.EvalSpec.digits` uses, prompts in the
  same interleaved order), so the shipped numbers are not the tuning numbers.
- Export: the asset folder, diffusers layout (see `export`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

import convert
from examples.tiny_flux_setup import (
    N_CLASSES,
    SIZE,
    Bundle,
    TrainConfig,
    param_count,
    sample,
    scheduler,
)
from pqjax.eval.digits import fit_classifier, frechet_distance, load_digits16

TUNE_SEED = 999
EVAL_SEED = 1234
MODEL_INDEX = {
    "_class_name": "TinyFluxDigitsPipeline",
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "text_encoder": ["pqjax", "PromptTable"],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
}


def interleaved(per_digit: int) -> np.ndarray:
    """Prompt rows 0..9, 0..9, ... `(10 * per_digit,)`: EvalSpec.digits' order."""
    return np.tile(np.arange(N_CLASSES), per_digit)


def score(images: np.ndarray, rows: np.ndarray, clf: Any, real_feats: np.ndarray
          ) -> dict[str, Any]:
    pred = clf.predict(images)
    per_digit = {str(d): round(float(np.mean(pred[rows == d] == d)), 3) for d in range(N_CLASSES)}
    return {"accuracy": round(float(np.mean(pred == rows)), 4), "per_digit": per_digit,
            "frechet": round(frechet_distance(clf.features(images), real_feats), 3)}


def choose(grid: list[dict[str, Any]]) -> dict[str, Any]:
    """The tuning rule of the module docstring, on rows with accuracy, frechet, steps."""
    best = max(r["accuracy"] for r in grid)
    top = [r for r in grid if r["accuracy"] == best]
    fd_min = min(r["frechet"] for r in top)
    near = [r for r in top if r["frechet"] <= 1.1 * fd_min]
    return min(near, key=lambda r: (r["num_inference_steps"], r["frechet"]))


def tune_and_evaluate(bundle: Bundle, cfg: TrainConfig) -> dict[str, Any]:
    """Grid-search the sampling defaults, then score fresh samples with them."""
    clf = fit_classifier(seed=0)
    real, real_labels = load_digits16()
    real_feats = clf.features(real)
    model, table = bundle.transformer, bundle.text_encoder
    rows = interleaved(cfg.tune_per_digit)
    grid = []
    for steps in cfg.tune_steps:
        for g in cfg.tune_guidance:
            s = score(sample(model, table, rows, TUNE_SEED, steps, g), rows, clf, real_feats)
            grid.append({"num_inference_steps": steps, "guidance_scale": g,
                         "accuracy": s["accuracy"], "frechet": s["frechet"]})
            print(f"tune: steps {steps:3d} guidance {g:4.1f}  accuracy {s['accuracy']:.3f}  "
                  f"frechet {s['frechet']:.3f}")
    pick = choose(grid)
    steps, g = pick["num_inference_steps"], pick["guidance_scale"]

    rows = interleaved(cfg.eval_per_digit)
    images = sample(model, table, rows, EVAL_SEED, steps, g)
    result = score(images, rows, clf, real_feats)
    unguided = score(sample(model, table, rows, EVAL_SEED, steps, 1.0), rows, clf, real_feats)
    # the floor the metric reaches with real digits: as many real images, same class balance
    rng = np.random.default_rng(cfg.seed)
    real_pick = np.concatenate([rng.choice(np.flatnonzero(real_labels == d), cfg.eval_per_digit,
                                           replace=False) for d in range(N_CLASSES)])
    return {
        "num_inference_steps": steps, "guidance_scale": g,
        "samples_per_digit": cfg.eval_per_digit, "noise_seed": EVAL_SEED, **result,
        "guidance_1": {"accuracy": unguided["accuracy"], "frechet": unguided["frechet"]},
        "frechet_real_subset": round(frechet_distance(clf.features(real[real_pick]),
                                                      real_feats), 3),
        "classifier": "pqjax.eval.digits.fit_classifier(seed=0), fitted on all real digits",
        "grid": grid, "images": images, "rows": rows,
    }


def save_grid(images: np.ndarray, rows: np.ndarray, path: Path, per_digit: int = 8) -> None:
    """A PNG: one column per digit, `per_digit` samples down; pixels 2× for visibility."""
    from PIL import Image

    cols = [images[rows == d][:per_digit] for d in range(N_CLASSES)]
    n = min(len(c) for c in cols)
    pad = 2
    canvas = np.ones((n * (SIZE + pad) + pad, N_CLASSES * (SIZE + pad) + pad), np.float32)
    for d, col in enumerate(cols):
        for i in range(n):
            y, x = pad + i * (SIZE + pad), pad + d * (SIZE + pad)
            canvas[y:y + SIZE, x:x + SIZE] = 1.0 - col[i]  # ink dark on white
    img = Image.fromarray(np.round(canvas * 255).astype(np.uint8))
    img.resize((img.width * 2, img.height * 2), Image.NEAREST).save(path)


def _json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def export(bundle: Bundle, cfg: TrainConfig, facts: dict[str, Any], ev: dict[str, Any],
           asset_dir: str) -> Path:
    """Write the asset folder (staged beside it, then swapped in):

    model_index.json, transformer/ (config.json + float32 safetensors, diffusers layout),
    text_encoder/ (PromptTable), scheduler/scheduler_config.json, pipeline.json (sampling
    defaults + measured facts), samples.png, README.md (model card).
    """
    out = Path(asset_dir)
    stage = out.with_name(out.name + ".staging")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    convert.export_transformer(bundle.transformer, stage / "transformer")
    bundle.text_encoder.save(stage / "text_encoder")
    (stage / "scheduler").mkdir()
    _json(stage / "scheduler" / "scheduler_config.json", scheduler().to_config())
    _json(stage / "model_index.json", MODEL_INDEX)
    keep = ("accuracy", "per_digit", "frechet", "frechet_real_subset", "guidance_1",
            "samples_per_digit", "noise_seed", "classifier")
    training = {
        "seed": cfg.seed, "batch": cfg.batch,
        "parameters": param_count(bundle.transformer),
        "teacher": {k: v for k, v in facts["teacher"].items() if k != "loss_history"},
        "distill": {k: v for k, v in facts["distill"].items() if k != "loss_history"},
        "eval": facts["eval"], "guidance_range": list(cfg.guidance_range),
        "p_uncond": cfg.p_uncond, "command": "python -m examples.train_tiny_flux",
    }
    pipeline = {
        "_class_name": "TinyFluxDigitsPipeline",
        "num_inference_steps": ev["num_inference_steps"], "guidance_scale": ev["guidance_scale"],
        "height": SIZE, "width": SIZE, "latent_channels": 1, "vae_scale_factor": 1,
        "value_range": [-1.0, 1.0], "prompt_template": "a handwritten digit {}",
        "training": training,
        "evaluation": {k: ev[k] for k in keep},
        "tuning_grid": ev["grid"],
    }
    _json(stage / "pipeline.json", pipeline)
    save_grid(ev["images"], ev["rows"], stage / "samples.png")
    (stage / "README.md").write_text(model_card(cfg, pipeline))
    if out.exists():
        shutil.rmtree(out)
    os.replace(stage, out)
    return out


def model_card(cfg: TrainConfig, p: dict[str, Any]) -> str:
    t, e = p["training"], p["evaluation"]
    per = ", ".join(f"{d}: {a:.0%}" for d, a in e["per_digit"].items())
    c = cfg.flux_config()
    return f"""# tiny-flux-digits

A small, really trained FLUX.1-architecture model shipped inside pqjax, so that the whole
quantization pipeline runs on a fresh machine with no downloads. It draws 16×16 handwritten
digits from a prompt such as `"a handwritten digit 7"`.

![samples](samples.png)

*Samples at the defaults below (one column per digit, noise seed {e['noise_seed']}).*

## Model

- **Transformer**: diffusers `FluxTransformer2DModel`, {c.num_layers} double + \
{c.num_single_layers} single blocks, hidden {c.inner_dim} ({c.num_attention_heads} heads × \
{c.attention_head_dim}), RoPE axes {list(c.axes_dims_rope)}, `in_channels` 4, joint attention \
dim {c.joint_attention_dim}, pooled dim {c.pooled_projection_dim}, guidance embedding on; \
{t['parameters']:,} parameters, float32 safetensors. diffusers loads `transformer/` as is.
- **Text encoder**: `pqjax.models.text_table.PromptTable`, a learned table: per digit \
{cfg.text_tokens} tokens × {c.joint_attention_dim} (`encoder_hidden_states`) and a \
{c.pooled_projection_dim}-d `pooled_projections`, plus a null row for the empty prompt. \
Accepted prompts: "a handwritten digit 7", "digit 7", "7", "seven", "" (null).
- **Autoencoder**: none (identity): pixel space, 1 channel, `vae_scale_factor` 1, values in \
[-1, 1], packed 2×2 into 64 tokens × 4 channels exactly as FLUX packs latents.
- **Scheduler**: FLUX.1-dev's `FlowMatchEulerDiscreteScheduler` settings (dynamic shifting).

## Training

- **Data**: scikit-learn's 1797 bundled 8×8 digits, bilinearly upscaled to 16×16 \
(`pqjax.eval.digits.load_digits16`).
- **Objective**: rectified flow as FLUX uses it: x_t = (1 − σ) x0 + σ ε, the model predicts \
ε − x0 with timestep σ; σ from FLUX's shifted logit-normal (shift for 64 tokens).
- **Phase 1, teacher** ({t['teacher']['steps']} steps, batch {t['batch']}, AdamW lr \
{t['teacher']['lr']:g}, warmup + cosine): prompt dropped to null with p = {t['p_uncond']}, \
guidance input 1. Final loss {t['teacher']['final_loss']:.4f}.
- **Phase 2, guidance distillation** ({t['distill']['steps']} steps, lr \
{t['distill']['lr']:g}): for g ~ U{t['guidance_range']} the student (initialised from the \
teacher) matches the teacher's v_uncond + g·(v_cond − v_uncond) with g fed through the \
guidance embedding, as FLUX.1-dev. Prompt table frozen. Final loss \
{t['distill']['final_loss']:.4f}.
- Seed {t['seed']}; wall clock (CPU time) on 2 CPU cores shared with other jobs: teacher \
{t['teacher']['wall_s']:.0f} s ({t['teacher']['cpu_s']:.0f} s), distillation \
{t['distill']['wall_s']:.0f} s ({t['distill']['cpu_s']:.0f} s), tuning + evaluation \
{t['eval']['wall_s']:.0f} s ({t['eval']['cpu_s']:.0f} s). Final losses are means over the \
last 100 steps.

## Sampling defaults

`num_inference_steps` {p['num_inference_steps']}, `guidance_scale` {p['guidance_scale']} (one \
forward per step, no CFG), 16×16.

## Evaluation

A classifier fitted on the real digits (`pqjax.eval.digits.fit_classifier`, ~98.5% on held-out
real digits) labels {e['accuracy']:.1%} of {e['samples_per_digit']} samples per digit as \
their prompt's digit ({per}). Without guidance (g = 1): {e['guidance_1']['accuracy']:.1%}. \
Fréchet distance to the real digits in the classifier's feature space: {e['frechet']:.3f} \
(real digits, same count and balance: {e['frechet_real_subset']:.3f}).

## Regenerate

```
python -m examples.train_tiny_flux        # from the repository root; --quick for a smoke test
```
"""
