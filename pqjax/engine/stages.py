"""How a model splits into the engine's stages: one per transformer block, then the model stage.

    stages = Stages.of(model, config)       # a real or an abstract (nnx.eval_shape) model
    stages.blocks                           # [Block("transformer_blocks.0", ...), ...] in order
    stages.block_sites["transformer_blocks.0"]   # its sites, paths relative to the block
    stages.model_sites                      # sites spanning blocks (FLUX's temb), absolute
    stages.deferred                         # block Linears those sites read

A site belongs to a block when its consumers, edited parameters and norms all lie inside that
block; the block's stage decides it. A site that spans blocks (every AdaLN linear of FLUX reads
the same temb) is decided in the model stage, after every block, together with the Linears
outside the blocks: its consumers inside blocks are "deferred", left in full precision by
their block's stage (their output columns still take the block's own edits), and quantized in
the model stage once their input order is known. Its edits must lie outside the blocks (the
embedders that produce it).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx

from pqjax import permute
from pqjax.calibrate import Calibration, linears
from pqjax.models.family import Family, family_of
from pqjax.quantize import QuantConfig, is_skipped


@dataclasses.dataclass(frozen=True)
class Block:
    """One transformer block: `name` its dotted path, `list_name` the list holding it."""

    name: str
    list_name: str
    index: int


def under(path: str, prefix: str) -> bool:
    return path.startswith(prefix + ".")


def rel(path: str, prefix: str) -> str:
    """`path` relative to the block `prefix` ("" for the model itself)."""
    return path[len(prefix) + 1:] if prefix else path


def rel_site(site: permute.Site, prefix: str) -> permute.Site:
    """`site` with its name and paths re-rooted at the block `prefix`."""
    return dataclasses.replace(
        site,
        name=rel(site.name, prefix),
        consumers=tuple(rel(c, prefix) for c in site.consumers),
        edits=tuple(dataclasses.replace(e, param=rel(e.param, prefix)) for e in site.edits),
        norms=tuple(rel(n, prefix) for n in site.norms),
    )


def _paths(site: permute.Site) -> list[str]:
    return [*site.consumers, *(e.param for e in site.edits), *site.norms]


@dataclasses.dataclass(frozen=True)
class Stages:
    """The stages of one model under one config; see the module docstring."""

    family: Family | None
    blocks: tuple[Block, ...]
    block_sites: dict[str, list[permute.Site]]
    model_sites: list[permute.Site]
    deferred: frozenset[str]
    targets: dict[str, list[str]]  # stage ("" for the model stage) -> Linears it quantizes

    @classmethod
    def of(cls, model: nnx.Module, config: QuantConfig) -> Stages:
        fam = family_of(model)
        blocks = [] if fam is None or fam.runner is None else [
            Block(f"{lst}.{i}", lst, i) for lst in fam.block_lists
            for i in range(len(getattr(model, lst)))
        ]
        try:
            sites = permute.sites(model)
        except TypeError:  # a research model without declared sites
            sites = []
        block_sites: dict[str, list[permute.Site]] = {b.name: [] for b in blocks}
        model_sites = []
        for site in sites:
            home = next((b.name for b in blocks if under(site.name, b.name)), None)
            if home is not None and all(under(p, home) for p in _paths(site)):
                block_sites[home].append(rel_site(site, home))
            else:
                model_sites.append(site)
        deferred = set()
        for site in model_sites:
            for c in site.consumers:
                if any(under(c, b.name) for b in blocks):
                    deferred.add(c)
            inside = [p for p in [*(e.param for e in site.edits), *site.norms]
                      if any(under(p, b.name) for b in blocks)]
            if inside:
                raise NotImplementedError(
                    f"site {site.name} spans blocks and edits {inside[0]} inside a block; the "
                    "engine decides such sites after the blocks, from the layers outside them")
        targets: dict[str, list[str]] = {b.name: [] for b in blocks}
        targets[""] = []
        for path, _ in linears(model):
            if is_skipped(path, config):
                continue
            home = next((b.name for b in blocks if under(path, b.name)), "")
            targets["" if path in deferred else home].append(path)
        return cls(fam, tuple(blocks), block_sites, model_sites, frozenset(deferred), targets)

    def block_targets(self, block: Block) -> list[str]:
        """The Linears `block`'s stage quantizes, relative to the block."""
        return [rel(p, block.name) for p in self.targets[block.name]]

    def deferred_in(self, block: Block) -> list[str]:
        """The deferred Linears of `block`, relative to it."""
        return sorted(rel(p, block.name) for p in self.deferred if under(p, block.name))


def calib_under(calib: Calibration, prefix: str) -> Calibration:
    """The entries of `calib` under the block `prefix`, re-rooted there."""
    return {rel(k, prefix): v for k, v in calib.items() if under(k, prefix)}


def prefixed(rows: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Report rows keyed by block-relative paths, keyed by absolute ones (and the site each
    layer row names, absolute too)."""
    if not prefix:
        return dict(rows)
    out = {}
    for k, row in rows.items():
        if isinstance(row.get("site"), str):
            row = {**row, "site": f"{prefix}.{row['site']}"}
        out[f"{prefix}.{k}"] = row
    return out
