"""Train the embedded tiny FLUX model: class-conditional 16×16 digits, guidance distilled.

Run from the repository root (fixed seed; checkpoints under runs/, which git ignores):

    .venv/bin/python -m examples.train_tiny_flux             # the shipped model, ~20 min on 2 cores
    .venv/bin/python -m examples.train_tiny_flux --resume    # continue an interrupted run
    .venv/bin/python -m examples.train_tiny_flux --quick     # smoke test (~1 min), asset in runs/

What it does, FLUX.1-dev's recipe at toy scale (`examples/tiny_flux_setup.py` has the config):

- Data: scikit-learn's 1797 bundled 8×8 digits, upscaled to 16×16 (`pqjax.eval.digits`),
  in pixel space (identity autoencoder, 1 channel, vae_scale_factor 1), scaled to [-1, 1] and
  packed 2×2 as FLUX packs latents: 64 tokens × 4 channels, ids `latent_image_ids(16, 16)`.
- Model: the project's `FluxTransformer2DModel`, 2 double + 2 single blocks, hidden 128
  (2 heads × 64), guidance embedding on; adaLN-Zero initialisation.
- Text encoder: a `PromptTable` trained jointly with the transformer in phase 1: per digit
  6 learned tokens × 64 (`encoder_hidden_states`) and a 32-d pooled vector, plus a null row.
- Objective: rectified flow as FLUX uses it: x_t = (1 − σ) x0 + σ ε, target v = ε − x0,
  timestep = σ; σ from FLUX's shifted logit-normal (`sample_sigmas`). Plain MSE.
- Phase 1 (teacher): label dropout to the null prompt (p = 0.1) so the model is CFG-capable;
  guidance input fixed at 1.0.
- Phase 2 (guidance distillation, as FLUX.1-dev is distilled from a CFG teacher): the student
  starts as the teacher; for g ~ U[1, 5] its target is the frozen teacher's
  v_uncond + g·(v_cond − v_uncond), and g goes in through the guidance embedding. The prompt
  table stays frozen (the text encoder is fixed, as T5/CLIP are for FLUX). At inference: one
  forward per step with `guidance=g`, no CFG, as FluxPipeline samples FLUX.1-dev.
- Then: sampling defaults are tuned on the student (classifier accuracy, Fréchet distance),
  evaluated on 20 samples per digit with fixed keys, and exported (`tiny_flux_eval`).

Optimiser: AdamW (β2 0.99) with linear warmup and cosine decay, global-norm clipping; batches
and noise come from `fold_in(seed, step)`, so a resumed run repeats the uninterrupted one.
Checkpoints (params, optimiser state, step, timings, loss history) are orbax saves, written
to a temporary folder and renamed when complete, so an interrupted save is never read back.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm import tqdm

from examples.tiny_flux_setup import (
    N_CLASSES,
    QUICK,
    Bundle,
    Flat,
    TrainConfig,
    packed_digits,
    sample_sigmas,
    velocity,
)

LOG_EVERY = 25  # steps per entry of the loss history (its mean over those steps)


def make_optimizer(cfg: TrainConfig, lr: float, steps: int) -> optax.GradientTransformation:
    warmup = max(1, min(cfg.warmup, steps // 4))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, end_value=lr * 0.02)
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(schedule, b1=0.9, b2=0.99, weight_decay=cfg.weight_decay),
    )


def noised(key: jax.Array, x0: jax.Array, labels: jax.Array, cfg: TrainConfig
           ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """x_t `(b, 64, 4)`, σ `(b,)`, target ε − x0, and prompt rows (10% dropped to null)."""
    k_drop, k_sig, k_eps = jax.random.split(key, 3)
    rows = jnp.where(jax.random.uniform(k_drop, labels.shape) < cfg.p_uncond, N_CLASSES, labels)
    sigma = sample_sigmas(k_sig, x0.shape[0], cfg.logit_std)
    eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
    s = sigma[:, None, None]
    return (1.0 - s) * x0 + s * eps, sigma, eps - x0, rows


def teacher_step(graphdef: Any, flat: Flat, tx: optax.GradientTransformation, cfg: TrainConfig
                 ) -> Callable:
    """Phase 1 step on the bundle (transformer + prompt table): flow-matching MSE."""

    @jax.jit
    def step(params, opt_state, x0_all, labels_all, idx, key):
        def loss_fn(params):
            bundle = nnx.merge(graphdef, flat.unflatten(params))
            xt, sigma, target, rows = noised(key, x0_all[idx], labels_all[idx], cfg)
            embeds, pooled = bundle.text_encoder(rows)
            g = jnp.full(sigma.shape, cfg.teacher_guidance, jnp.float32)
            v = velocity(bundle.transformer, xt, embeds, pooled, sigma, g)
            return jnp.mean((v - target) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def distill_step(graphdef: Any, flat: Flat, tx: optax.GradientTransformation, cfg: TrainConfig,
                 teacher: Any, table: Any) -> Callable:
    """Phase 2 step on the student transformer against the frozen CFG teacher."""
    g_lo, g_hi = cfg.guidance_range
    (t_graph, t_state), (tab_graph, tab_state) = teacher, table

    @jax.jit
    def jitted(params, opt_state, x0_all, labels_all, idx, key, t_state, tab_state):
        k_noise, k_g = jax.random.split(key)
        xt, sigma, _, rows = noised(k_noise, x0_all[idx], labels_all[idx], cfg)
        g = jax.random.uniform(k_g, sigma.shape, jnp.float32, g_lo, g_hi)
        tab = nnx.merge(tab_graph, tab_state)
        embeds, pooled = tab(rows)
        null_e, null_p = tab(jnp.full_like(rows, N_CLASSES))
        # cond and uncond teacher passes in one batch; the guided velocity is the target
        v = velocity(nnx.merge(t_graph, t_state), jnp.concatenate([xt, xt]),
                     jnp.concatenate([embeds, null_e]), jnp.concatenate([pooled, null_p]),
                     jnp.concatenate([sigma, sigma]),
                     jnp.full((2 * len(sigma),), cfg.teacher_guidance, jnp.float32))
        v_c, v_u = jnp.split(v, 2)
        target = jax.lax.stop_gradient(v_u + g[:, None, None] * (v_c - v_u))

        def loss_fn(params):
            student = nnx.merge(graphdef, flat.unflatten(params))
            return jnp.mean((velocity(student, xt, embeds, pooled, sigma, g) - target) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    # frozen weights go in as arguments, not as constants baked into the program
    return lambda *args: jitted(*args, t_state, tab_state)


def run_phase(name: str, phase: int, steps: int, lr: float, step_fn: Callable, params: dict,
              cfg: TrainConfig, tx: optax.GradientTransformation, resume: bool
              ) -> tuple[dict, dict[str, Any]]:
    """Train `params` for `steps` with checkpoints in `run_dir/name`; returns (params, facts)."""
    x0_all, labels_all = packed_digits()
    opt_state = tx.init(params)
    folder = Path(cfg.run_dir).resolve() / name
    mngr = ocp.CheckpointManager(folder, options=ocp.CheckpointManagerOptions(
        max_to_keep=2, create=True, enable_async_checkpointing=False))
    start, meta = 0, {"wall_s": 0.0, "cpu_s": 0.0, "history": [], "loads": []}
    if mngr.latest_step() is not None:
        if not resume:
            raise SystemExit(f"{folder} has checkpoints: pass --resume, or delete the folder")
        start = mngr.latest_step()
        got = mngr.restore(start, args=ocp.args.Composite(
            state=ocp.args.StandardRestore({"params": params, "opt_state": opt_state}),
            meta=ocp.args.JsonRestore()))
        params, opt_state, meta = got.state["params"], got.state["opt_state"], got.meta
        print(f"{name}: resumed at step {start}/{steps}")
    t_wall, t_cpu, window = time.perf_counter(), time.process_time(), []

    def save(step: int) -> None:
        meta.update(step=step, wall_s=meta["wall_s"] + time.perf_counter() - t_wall,
                    cpu_s=meta["cpu_s"] + time.process_time() - t_cpu, lr=lr)
        meta["loads"].append(os.getloadavg()[0])  # the machine is shared: keep the evidence
        mngr.save(step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
            meta=ocp.args.JsonSave(meta)))

    base = jax.random.fold_in(jax.random.key(cfg.seed), phase)
    with tqdm(total=steps, initial=start, desc=name, dynamic_ncols=True) as bar:
        for step in range(start, steps):
            # batch and noise depend on (seed, phase, step) only: resuming is exact
            rng = np.random.default_rng([cfg.seed, phase, step])
            idx = jnp.asarray(rng.integers(0, len(labels_all), cfg.batch), jnp.int32)
            params, opt_state, loss = step_fn(params, opt_state, x0_all, labels_all, idx,
                                              jax.random.fold_in(base, step))
            window.append(float(loss))
            bar.update(1)
            if (step + 1) % LOG_EVERY == 0 or step + 1 == steps:
                meta["history"].append([step + 1, float(np.mean(window))])
                bar.set_postfix(loss=f"{np.mean(window):.4f}")
                window = []
            if (step + 1) % cfg.ckpt_every == 0 or step + 1 == steps:
                save(step + 1)
                t_wall, t_cpu = time.perf_counter(), time.process_time()
    mngr.wait_until_finished()
    mngr.close()
    hist = meta["history"]
    tail = [loss for _, loss in hist[-4:]]  # the last 100 steps' mean: one batch is noisy
    facts = {"steps": steps, "lr": lr, "wall_s": round(meta["wall_s"], 1),
             "cpu_s": round(meta["cpu_s"], 1), "final_loss": round(float(np.mean(tail)), 5),
             "max_load_avg": round(max(meta["loads"], default=0.0), 2), "loss_history": hist}
    return params, facts


def train(cfg: TrainConfig, resume: bool) -> tuple[Bundle, Any, dict[str, Any]]:
    """Both phases. Returns the bundle holding the student, the teacher state and the facts."""
    bundle = Bundle(cfg, nnx.Rngs(cfg.seed))
    graphdef, state = nnx.split(bundle)
    flat = Flat(state)
    tx = make_optimizer(cfg, cfg.teacher_lr, cfg.teacher_steps)
    params, teacher_facts = run_phase(
        "teacher", 1, cfg.teacher_steps, cfg.teacher_lr,
        teacher_step(graphdef, flat, tx, cfg), flat.flatten(state), cfg, tx, resume)
    nnx.update(bundle, flat.unflatten(params))

    t_graph, t_state = nnx.split(bundle.transformer)
    teacher = (t_graph, jax.tree_util.tree_map(jnp.array, t_state))  # a frozen copy
    table = nnx.split(bundle.text_encoder)
    s_flat = Flat(t_state)
    tx = make_optimizer(cfg, cfg.distill_lr, cfg.distill_steps)
    params, distill_facts = run_phase(
        "student", 2, cfg.distill_steps, cfg.distill_lr,
        distill_step(t_graph, s_flat, tx, cfg, teacher, table), s_flat.flatten(t_state), cfg,
        tx, resume)
    nnx.update(bundle.transformer, s_flat.unflatten(params))
    return bundle, teacher, {"teacher": teacher_facts, "distill": distill_facts}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: a few steps")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints")
    parser.add_argument("--asset-dir", help="where to export (default: the config's)")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else TrainConfig()
    from examples import tiny_flux_eval

    t0_wall, t0_cpu = time.perf_counter(), time.process_time()
    bundle, _, facts = train(cfg, args.resume)
    t1_wall, t1_cpu = time.perf_counter(), time.process_time()
    evaluation = tiny_flux_eval.tune_and_evaluate(bundle, cfg)
    facts["eval"] = {"wall_s": round(time.perf_counter() - t1_wall, 1),
                     "cpu_s": round(time.process_time() - t1_cpu, 1)}
    facts["this_invocation"] = {"wall_s": round(time.perf_counter() - t0_wall, 1),
                                "cpu_s": round(time.process_time() - t0_cpu, 1)}
    out = tiny_flux_eval.export(bundle, cfg, facts, evaluation, args.asset_dir or cfg.asset_dir)
    run = Path(cfg.run_dir)
    summary = {k: v for k, v in evaluation.items() if k not in ("images", "rows")}
    (run / "facts.json").write_text(json.dumps({"facts": facts, "eval": summary}, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "grid"}, indent=2))
    print(f"exported to {out}")


if __name__ == "__main__":
    main()
