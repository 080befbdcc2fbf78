"""Block-wise streaming quantization of FLUX.1: one full-precision block in memory at a time.

    qmodel, report = stream_quantize("flux-dev", batches, QuantConfig(), "runs/flux-q")

For each block in order: load its weights from the checkpoint, calibrate it on the cached
block inputs, search its permutation sites, absorb, quantize, write it to `work_dir/blocks/`
(atomically, with the manifest), run the full-precision block to produce the next block's
inputs, and free it. Peak memory stays near the quantized model plus one full-precision block
plus one calibration batch. An interrupted run resumes from the last finished block
(`resume=True`) and ends with the same checkpoint as an uninterrupted one.

Scope: methods "rtn" and "permuquant". The `temb` site (every AdaLN linear reads the same
temb) spans all blocks and is left to the in-memory path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

import convert
from convert import registry
from convert.loader import check_block_counts, load_submodule, open_weights, read_config
from pqjax import permute
from pqjax.calibrate import calibrate, linears
from pqjax.checkpoint import apply_layout, module_layout, restore_state, save_state
from pqjax.layers import QuantLinear
from pqjax.methods import Plan, rtn_errors, search_sites
from pqjax.models.paths import module_at
from pqjax.quantize import QuantConfig, is_skipped, set_module
from pqjax.report import QuantReport

BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


class StreamInterrupted(RuntimeError):
    """Raised by `stop_after` (tests) after that many blocks were finished in this run."""


def _rel(site: permute.Site, prefix: str) -> permute.Site:
    """`site` with its name and paths re-rooted at the block `prefix`."""
    cut = len(prefix) + 1
    return dataclasses.replace(
        site,
        name=site.name[cut:],
        consumers=tuple(c[cut:] for c in site.consumers),
        edits=tuple(dataclasses.replace(e, param=e.param[cut:]) for e in site.edits),
        norms=tuple(n[cut:] for n in site.norms),
    )


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    os.replace(tmp, path)


@nnx.jit
def _embed(shell: nnx.Module, batch: dict[str, jax.Array]) -> tuple[jax.Array, ...]:
    return shell.embed(
        **{
            k: batch.get(k)
            for k in (
                "hidden_states",
                "encoder_hidden_states",
                "pooled_projections",
                "timestep",
                "img_ids",
                "txt_ids",
                "guidance",
            )
        }
    )


@nnx.jit
def _block_forward(
    block: nnx.Module,
    x: jax.Array,
    context: jax.Array,
    temb: jax.Array,
    rope: tuple[jax.Array, jax.Array],
) -> tuple[jax.Array, jax.Array]:
    return block(x, context, temb, rope)


class _Streamer:
    """The model shell (embedders, final layers) plus abstract blocks loaded on demand."""

    def __init__(self, source: str | os.PathLike, dtype: Any, allow_pickle: bool = False):
        self.folder = convert.resolve(source, "transformer")
        raw = read_config(self.folder)
        spec = registry.spec_for_class_name(raw.get("_class_name", ""), str(self.folder))
        if spec.class_name != "FluxTransformer2DModel":
            raise NotImplementedError(
                f"streaming quantization supports FLUX.1; got {spec.class_name}"
            )
        config = spec.parse(raw, str(self.folder / "config.json"))
        self.dtype = dtype
        self.weights = open_weights(self.folder, spec.weights_name, allow_pickle=allow_pickle)
        check_block_counts(spec, config, self.weights.keys(), str(self.folder / "config.json"))
        self.model = nnx.eval_shape(lambda: spec.module(config, dtype=dtype, rngs=nnx.Rngs(0)))
        self.sites = [s for s in permute.sites(self.model) if s.name != "temb"]
        self.names = [
            f"{lst}.{i}" for lst in BLOCK_LISTS for i in range(len(getattr(self.model, lst)))
        ]
        self.blocks = {n: module_at(self.model, n) for n in self.names}
        for lst in BLOCK_LISTS:  # the shell holds no abstract leaves: it can run under jit
            setattr(self.model, lst, nnx.List([]))
        for name, child in list(vars(self.model).items()):
            if isinstance(child, nnx.Module) and name not in BLOCK_LISTS:
                setattr(self.model, name, load_submodule(child, name, self.weights, dtype=dtype))

    def fp_block(self, name: str) -> nnx.Module:
        return load_submodule(nnx.clone(self.blocks[name]), name, self.weights, dtype=self.dtype)

    def assemble(self, done: dict[str, nnx.Module]) -> nnx.Module:
        model = nnx.clone(self.model)
        for lst in BLOCK_LISTS:
            n = sum(1 for k in self.names if k.startswith(lst + "."))
            setattr(model, lst, nnx.List([done[f"{lst}.{i}"] for i in range(n)]))
        return model


def stream_quantize(
    source: str | os.PathLike,
    batches: Sequence[dict[str, jax.Array]],
    config: QuantConfig,
    work_dir: str | os.PathLike,
    *,
    dtype: Any = jnp.bfloat16,
    n_rows: int = 256,
    resume: bool = True,
    stop_after: int | None = None,
    allow_pickle: bool = False,
) -> tuple[nnx.Module, QuantReport]:
    """Quantize the FLUX transformer at `source` block by block (see the module docstring).

    batches: transformer inputs (diffusers keywords) along full-precision trajectories, e.g.
    `Pipeline.calibration_batches`. Returns the quantized model and its report. allow_pickle:
    also read pickled `.bin`/`.pt` weights (torch, `weights_only=True`).
    """
    if config.method not in ("rtn", "permuquant"):
        raise ValueError(f"streaming supports methods rtn and permuquant, not {config.method!r}")
    t0 = time.perf_counter()
    work = Path(work_dir).expanduser().resolve()  # orbax writes to absolute paths only
    (work / "blocks").mkdir(parents=True, exist_ok=True)
    st = _Streamer(source, dtype, allow_pickle)
    manifest_path = work / "manifest.json"
    ident = {
        "source": str(st.folder),
        # progress only shows bars: a run resumed with other settings is the same work
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "progress"},
        "dtype": jnp.dtype(dtype).name,
        "n_rows": n_rows,
        "n_batches": len(batches),
    }
    manifest = {**ident, "blocks": {}}
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if not resume:
            raise FileExistsError(f"{work} holds a previous run; pass resume=True or a new folder")
        if {k: old.get(k) for k in ident} != json.loads(json.dumps(ident, default=float)):
            raise ValueError(
                f"{manifest_path}: written for another source/config; use a new folder"
            )
        manifest = old
    cache = [tuple(jax.device_get(a) for a in _embed(st.model, b)) for b in batches]
    done: dict[str, nnx.Module] = {}
    layer_rows: dict[str, Any] = {}
    site_rows: dict[str, Any] = {}
    perms: dict[str, np.ndarray] = {}
    finished_now = 0
    bar = tqdm(st.names, desc="stream-quantize", unit="block", disable=not config.progress)
    for k, name in enumerate(bar):
        fp = st.fp_block(name)
        entry = manifest["blocks"].get(name)
        if entry is not None:  # finished earlier: restore it, recompute its outputs only
            q = restore_state(
                apply_layout(nnx.clone(st.blocks[name]), entry["layers"], entry["perms"]),
                work / "blocks" / name,
            )
            with np.load(work / "blocks" / f"{name}.perms.npz") as z:
                perms.update({key: z[key] for key in z.files})
        else:
            q, entry, block_perms = quantize_block(name, fp, cache, config, st.sites, n_rows,
                                                   seed=config.seed + k)
            save_state(q, work / "blocks" / name)
            np.savez(work / "blocks" / f"{name}.perms.npz", **block_perms)
            perms.update(block_perms)
            manifest["blocks"][name] = entry
            _write_json(manifest_path, manifest)
            finished_now += 1
        layer_rows.update(entry["report_layers"])
        site_rows.update(entry["report_sites"])
        done[name] = q
        cache = [_next(fp, c) for c in cache]
        del fp
        if stop_after is not None and finished_now >= stop_after and k + 1 < len(st.names):
            raise StreamInterrupted(f"stopped after {finished_now} blocks (block {name})")
    qmodel = st.assemble(done)
    plan = Plan(model=qmodel, layers=layer_rows, sites=site_rows, perms=perms)
    return qmodel, QuantReport.build(qmodel, qmodel, config, plan, time.perf_counter() - t0)


def _next(fp: nnx.Module, c: tuple) -> tuple:
    """The next block's cached inputs: (x, context) from the full-precision block."""
    x, context, temb, rope = c
    new_context, new_x = _block_forward(
        fp, jnp.asarray(x), jnp.asarray(context), jnp.asarray(temb), rope
    )
    return jax.device_get(new_x), jax.device_get(new_context), temb, rope


def quantize_block(
    name: str,
    fp: nnx.Module,
    cache: list[tuple],
    config: QuantConfig,
    sites: list[permute.Site],
    n_rows: int = 256,
    *,
    seed: int = 0,
) -> tuple[nnx.Module, dict[str, Any], dict[str, np.ndarray]]:
    """Calibrate, search, absorb and quantize one full-precision FLUX block `fp` at `name`.

    cache: the block's inputs per calibration batch, (x, context, temb, rope); sites: the
    model's sites (absolute paths; those of this block are used). Returns the quantized block,
    its manifest entry (layout + report rows) and its accepted orders.
    """
    head = name + "."
    calib_rel = calibrate(
        fp,
        [
            dict(x=jnp.asarray(c[0]), context=jnp.asarray(c[1]), temb=jnp.asarray(c[2]), rope=c[3])
            for c in cache
        ],
        n_rows=n_rows,
        seed=seed,
        progress=False,
        forward=lambda blk, x, context, temb, rope: blk(x, context, temb, rope),
    )
    targets = [rel for rel, _ in linears(fp) if not is_skipped(head + rel, config)]
    block_sites = [_rel(s, name) for s in sites if s.name.startswith(head)]
    perms: dict[str, np.ndarray] = {}
    if config.method == "permuquant":
        perms, site_rows, layer_rows = search_sites(
            fp, calib_rel, config, targets, site_list=block_sites, desc=name
        )
        accepted = {s: p for s, p in perms.items() if site_rows[s]["accepted"]}
        q = permute.absorb(fp, accepted, site_list=block_sites)
        perms = accepted
        rest = [t for t in targets if t not in layer_rows]  # read by no site (e.g. AdaLN linears)
        for path, err in rtn_errors(fp, calib_rel, config, rest).items():
            layer_rows[path] = {"err_rtn": err, "err": err, "accepted": False, "site": None}
    else:
        site_rows = {}
        layer_rows = {
            p: {"err_rtn": e, "err": e}
            for p, e in rtn_errors(fp, calib_rel, config, targets).items()
        }
        q = nnx.clone(fp)
    wfmt, afmt = config.weight_format(), config.act_format()
    for rel in targets:
        stats = calib_rel.get(rel)
        amax = None if stats is None else jnp.max(stats.absmax)
        set_module(
            q,
            rel,
            QuantLinear.from_linear(
                module_at(q, rel), weights=wfmt, acts=afmt, act_amax=amax, backend=config.backend
            ),
        )
    layers, norm_perms = module_layout(q)
    entry = {
        "layers": layers,
        "perms": norm_perms,
        "report_layers": {head + p: r for p, r in layer_rows.items()},
        "report_sites": {head + s: r for s, r in site_rows.items()},
    }
    return q, entry, {head + s: np.asarray(p) for s, p in perms.items()}
