"""The engine's loop: calibrate, decide and quantize one stage at a time, then assemble.

For each block in execution order: its full-precision weights (from memory or disk), its
statistics (given, or computed from its inputs), the method on the block with the block's
sites (`pqjax.methods`), the Plan applied (`pqjax.quantize.apply_plan`), the result stored.
Then the model stage: the layers outside the blocks and the deferred layers of sites that
span blocks (`pqjax.engine.stages`), gathered in a view of the model, decided by the same
method, applied the same way. Last, the quantized blocks and the model stage's layers are
assembled into the quantized model.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from pqjax.calibrate import Calibration
from pqjax.checkpoint_layout import apply_layout, module_layout
from pqjax.engine.sources import shell_of
from pqjax.engine.stages import Block, Stages, prefixed
from pqjax.engine.store import Aux, StreamInterrupted
from pqjax.host_memory import trim
from pqjax.methods import Plan, method_spec
from pqjax.models.paths import module_at
from pqjax.quantize import QuantConfig, apply_plan, set_module
from pqjax.report import QuantReport

MODEL_STAGE = "model"


class Stub(nnx.Module):
    """A stand-in for a block in the model stage's view: only the layers that stage reads,
    each at its own path."""


def place(root: nnx.Module, path: str, module: nnx.Module) -> None:
    """Put `module` at dotted `path` under `root`, making Stubs (or lists, before an index)
    on the way."""
    parts = path.split(".")
    node: Any = root
    for part, nxt in itertools.pairwise(parts):
        child = _child(node, part)
        if child is None:
            child = nnx.List([]) if nxt.isdigit() else Stub()
            _set_child(node, part, child)
        node = child
    _set_child(node, parts[-1], module)


def _child(node: Any, part: str) -> Any:
    if part.isdigit():
        return node[int(part)] if int(part) < len(node) else None
    return getattr(node, part, None)


def _set_child(node: Any, part: str, value: Any) -> None:
    if part.isdigit():
        while len(node) <= int(part):
            node.append(Stub())
        node[int(part)] = value
    else:
        setattr(node, part, value)


@dataclasses.dataclass
class Rows:
    """The report rows of every stage, by absolute path."""

    layers: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    sites: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    perms: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    absmax: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def add(self, entry: dict[str, Any], aux: Aux) -> None:
        self.layers.update(entry["layers"])
        self.sites.update(entry["sites"])
        self.perms.update(aux.perms)
        self.absmax.update(aux.absmax)


def run(source: Any, stages: Stages, stats: Any, store: Any, config: QuantConfig, *,
        shell: nnx.Module | None = None, digest: Callable[[], Any] | None = None,
        progress: bool = False, stop_after: int | None = None, assemble: bool = True,
        carries: bool = False) -> tuple[nnx.Module | None, QuantReport]:
    """Quantize `source` (a `pqjax.engine.sources` source) stage by stage; see the module
    docstring. stats: a `pqjax.engine.calibration` provider; store: where finished stages go
    (`pqjax.engine.store`). digest: a fresh hash per block read (its fingerprint is kept);
    carries: also store the block inputs after each block (to resume without recomputing)."""
    t0 = time.perf_counter()
    if not any(stages.targets.values()):
        raise ValueError(f"no Linear layer left to quantize after skip patterns {config.skip}")
    method = method_spec(config.method)
    shell = source.shell() if shell is None else shell
    stats.start(shell)
    rows = Rows()
    deferred: Calibration = {}
    done_now = 0
    bar = tqdm(total=len(stages.blocks) + 1, desc=f"quantize ({config.method})", unit="stage",
               disable=not progress)
    resume_after: Block | None = None
    for k, block in enumerate(stages.blocks):
        entry = store.entry(block.name)
        if entry is not None:  # finished by an earlier run of the same work
            aux = store.aux(block.name)
            rows.add(entry, aux)
            deferred.update(aux.stats)
            resume_after = block
            bar.update(1)
            continue
        if resume_after is not None:
            _resume(stats, store, source, stages, resume_after, digest)
            resume_after = None
        bar.set_postfix_str(block.name)
        q, entry, aux = _block_stage(block, source, stats, stages, method, config, digest)
        store.put(block.name, q, entry, aux, stats.carries if carries else None)
        rows.add(entry, aux)
        deferred.update(aux.stats)
        del q
        bar.update(1)
        done_now += 1
        if stop_after is not None and done_now >= stop_after and k + 1 < len(stages.blocks):
            raise StreamInterrupted(f"stopped after {done_now} blocks (block {block.name})")
    if resume_after is not None and store.entry(MODEL_STAGE) is None:
        _resume(stats, store, source, stages, resume_after, digest)
    bar.set_postfix_str(MODEL_STAGE)
    entry = store.entry(MODEL_STAGE)
    if entry is None:
        qview, entry, aux = _model_stage(shell, {**stats.finish(shell), **deferred}, source,
                                         stages, store, method, config)
        store.put(MODEL_STAGE, qview, entry, aux)
    else:
        aux = store.aux(MODEL_STAGE)
        qview = store.module(MODEL_STAGE, lambda: view_maker(source, stages, store)(
            entry["layout"]))
    rows.add(entry, aux)
    bar.update(1)
    bar.close()
    trim()  # the stages freed gigabytes; return them before the model is assembled
    qmodel = assemble_model(qview, stages, store, source) if assemble else None
    report = QuantReport.build(
        qmodel if qmodel is not None else _abstract_result(qview, stages, store, source),
        config, Plan(model=qmodel, layers=rows.layers, sites=rows.sites, perms=rows.perms),
        time.perf_counter() - t0, act_absmax=rows.absmax)
    return qmodel, report


def _block_stage(block: Block, source: Any, stats: Any, stages: Stages, method: Any,
                 config: QuantConfig, digest: Callable[[], Any] | None
                 ) -> tuple[nnx.Module, dict[str, Any], Aux]:
    """One block: its weights, its statistics, the method on its own sites, the plan applied.
    Returns (quantized block, manifest entry, arrays besides)."""
    started = time.time()
    h = None if digest is None else digest()
    fp = source.block(block.name, h)
    calib = stats.block(block, fp)
    targets = stages.block_targets(block)
    plan = method(fp, calib, config, targets, stages.block_sites[block.name])
    q = apply_plan(plan, calib, config, targets)
    layers, perms = module_layout(q)
    entry = {"list": block.list_name, "layout": {"layers": layers, "perms": perms},
             "layers": prefixed(plan.layers, block.name),
             "sites": prefixed(plan.sites, block.name),
             "source_sha256": None if h is None else h.hexdigest(),
             "started": started, "seconds": time.time() - started}
    return q, entry, _aux(plan, calib, block.name, stages.deferred_in(block))


def _model_stage(shell: nnx.Module, calib: Calibration, source: Any, stages: Stages,
                 store: Any, method: Any, config: QuantConfig
                 ) -> tuple[nnx.Module, dict[str, Any], Aux]:
    """The layers outside the blocks and the deferred ones, in a view of the model, with the
    sites that span blocks. Returns (quantized view, manifest entry, arrays besides)."""
    started = time.time()
    view = _view(shell, stages, store, source)
    targets = stages.targets[""]
    plan = method(view, calib, config, targets, stages.model_sites)
    del view  # the plan's model holds what it changed; what it did not, it shares
    qview = apply_plan(plan, calib, config, targets)
    layers, perms = module_layout(qview)
    entry = {"layout": {"layers": layers, "perms": perms}, "layers": plan.layers,
             "sites": plan.sites, "started": started, "seconds": time.time() - started}
    return qview, entry, _aux(plan, calib, "", [])


def _aux(plan: Plan, calib: Calibration, prefix: str, deferred: list[str]) -> Aux:
    """The stage's arrays besides its module, paths absolute (see `store.Aux`)."""
    def absolute(p: str) -> str:
        return f"{prefix}.{p}" if prefix else p

    return Aux(
        perms={absolute(k): np.asarray(v) for k, v in plan.perms.items()},
        absmax={absolute(p): np.asarray(calib[p].absmax) for p in plan.layers if p in calib},
        stats={absolute(p): calib[p] for p in deferred if p in calib},
    )


def _resume(stats: Any, store: Any, source: Any, stages: Stages, after: Block,
            digest: Callable[[], Any] | None) -> None:
    """Put the statistics provider where block `after` left it: its saved carries, or else
    the full-precision blocks run again up to it (their weights checked against the hashes
    recorded when they were first read)."""
    like = stats.structure_after(after.list_name)
    saved = store.carries(after.name, like)
    if saved is not None:
        stats.resume(saved, after.list_name)
        return
    for block in stages.blocks:
        h = None if digest is None else digest()
        stats.block(block, source.block(block.name, h))
        recorded = store.entry(block.name).get("source_sha256")
        if h is not None and recorded is not None and h.hexdigest() != recorded:
            raise ValueError(f"the weights of {block.name} changed since the run in "
                             f"{store.root} read them; use a new work folder")
        if block == after:
            return


def _block_abstract(source: Any, name: str, layout: dict[str, Any]) -> nnx.Module:
    return apply_layout(nnx.clone(module_at(source.abstract, name)), layout["layers"],
                        layout["perms"])


def _view(shell: nnx.Module, stages: Stages, store: Any, source: Any) -> nnx.Module:
    """The model stage's view: the shell, with the deferred layers of every block (in full
    precision, after their block's own edits) at their paths."""
    view = nnx.clone(shell)
    _stub_lists(view, stages)
    for block in stages.blocks:
        names = stages.deferred_in(block)
        if not names:
            continue
        q = store.module(block.name, lambda b=block: _block_abstract(
            source, b.name, store.entry(b.name)["layout"]))
        for r in names:
            place(view, f"{block.name}.{r}", module_at(q, r))
    return view


def _stub_lists(view: nnx.Module, stages: Stages) -> None:
    if stages.family is None:
        return
    for lst in stages.family.block_lists:
        n = sum(1 for b in stages.blocks if b.list_name == lst)
        setattr(view, lst, nnx.List([Stub() for _ in range(n)]))


def view_maker(source: Any, stages: Stages, store: Any) -> Callable[[dict[str, Any]], Any]:
    """layout -> the abstract model-stage view with that layout (to read a stored one)."""
    def make(layout: dict[str, Any]) -> nnx.Module:
        lists = () if stages.family is None else stages.family.block_lists
        view = shell_of(source.abstract, lists)
        _stub_lists(view, stages)
        for block in stages.blocks:
            for r in stages.deferred_in(block):
                abstract = module_at(source.abstract, f"{block.name}.{r}")
                place(view, f"{block.name}.{r}", nnx.clone(abstract))
        return apply_layout(view, layout["layers"], layout["perms"])

    return make


def assemble_model(qview: nnx.Module, stages: Stages, store: Any, source: Any) -> nnx.Module:
    """The quantized model: the model stage's view with every quantized block in place, its
    deferred layers the model stage's."""
    def stored(block: Block) -> nnx.Module:
        return store.module(block.name, lambda: _block_abstract(
            source, block.name, store.entry(block.name)["layout"]))

    return _with_blocks(qview, stages, stored)


def _abstract_result(qview: nnx.Module, stages: Stages, store: Any, source: Any) -> nnx.Module:
    """The quantized model with shapes only (for the report when the blocks stay on disk)."""
    return _with_blocks(nnx.clone(qview), stages, lambda block: _block_abstract(
        source, block.name, store.entry(block.name)["layout"]))


def _with_blocks(view: nnx.Module, stages: Stages, block_of: Callable[[Block], nnx.Module]
                 ) -> nnx.Module:
    """`view` with its stub lists replaced by `block_of(block)` for every block, each
    block's deferred layers taken from the view."""
    if stages.family is None:
        return view
    blocks: dict[str, list[nnx.Module]] = {lst: [] for lst in stages.family.block_lists}
    for block in stages.blocks:
        q = block_of(block)
        for r in stages.deferred_in(block):
            set_module(q, r, module_at(view, f"{block.name}.{r}"))
        blocks[block.list_name].append(q)
    for lst, items in blocks.items():
        setattr(view, lst, nnx.List(items))
    return view


__all__ = ["MODEL_STAGE", "Stub", "assemble_model", "place", "run"]
