"""The engine's calibration statistics, stage by stage: given for the whole model, or computed
one block at a time from the inputs of each block ("carries") kept on the host.

    stats = Blockwise(runner, batches, n_rows=256, seed=0)
    stats.start(shell)                    # the embedders run once per batch: first carries
    calib = stats.block(block, fp)        # the block's statistics; carries move past it
    calib = stats.finish(shell)           # the layers outside the blocks (embedders, head)

Every block runs once per batch, observed (`pqjax.calibrate`, with every batch's absmax kept:
one batch per sampling step, for PTQ4DiT's timestep weights), and its outputs are the next
block's inputs. Each Linear draws its sampled rows from the seed's stream by call index, as
in a whole-model `pqjax.calibrate` of the same batches, so the two agree up to float rounding
of programs compiled apart, and two runs of this one agree bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from pqjax.calibrate import Calibration, calibrate
from pqjax.engine.stages import Block, calib_under, under
from pqjax.models.family import Carry, Runner


class Given:
    """Statistics of the whole model, computed beforehand (`pqjax.calibrate`)."""

    def __init__(self, calib: Calibration, blocks: Sequence[Block]):
        self.calib = calib
        self.blocks = blocks

    def start(self, shell: Any) -> None:
        """Nothing to compute."""

    def block(self, block: Block, fp: Any) -> Calibration:
        return calib_under(self.calib, block.name)

    def finish(self, shell: Any) -> Calibration:
        return {k: v for k, v in self.calib.items()
                if not any(under(k, b.name) for b in self.blocks)}


class Blockwise:
    """Statistics computed block by block from `batches` (the model's calibration inputs,
    keywords of `runner.embed`)."""

    def __init__(self, runner: Runner, lists: Sequence[str], batches: Sequence[dict[str, Any]],
                 *, n_rows: int = 256, seed: int = 0):
        if not batches:
            raise ValueError("calibration: no batches were given")
        self.runner, self.lists, self.batches = runner, tuple(lists), list(batches)
        self.n_rows, self.seed = n_rows, seed
        self.carries: list[Carry] = []
        self.list_name: str | None = None  # the block list the carries are in
        self.shell_calib: Calibration = {}

    def _calibrate(self, module: Any, inputs: list[dict[str, Any]], forward: Any,
                   prefix: str = "") -> tuple[Calibration, list[Any]]:
        outputs: list[Any] = []
        calib = calibrate(module, inputs, n_rows=self.n_rows, seed=self.seed, forward=forward,
                          track_batches=len(self.batches), progress=False, collect=outputs,
                          prefix=prefix)
        return calib, outputs

    def start(self, shell: Any) -> None:
        """Run the embedders (observed) on every batch: the first block's inputs."""
        self.shell_calib, self.carries = self._calibrate(
            shell, self.batches, lambda m, **batch: self.runner.embed(m, **batch))
        self.list_name = None

    def structure_after(self, list_name: str) -> list[Any]:
        """The carries' structure (abstract) after a block of `list_name`, from the first
        carries (`start`): blocks keep it, entering a list may change it."""
        out = []
        for carry in self.carries:
            for lst in self.lists[: self.lists.index(list_name) + 1]:
                carry = jax.eval_shape(lambda c, lst=lst: self.runner.enter(lst, c), carry)
            out.append(carry)
        return out

    def resume(self, carries: list[Carry], list_name: str) -> None:
        """Continue from saved carries (those after a finished block of `list_name`)."""
        self.carries, self.list_name = list(carries), list_name

    def block(self, block: Block, fp: Any) -> Calibration:
        """Statistics of block `fp` at `block` (paths relative to it); the carries move on to
        its outputs."""
        if block.list_name != self.list_name:
            self.carries = [jax.device_get(self.runner.enter(block.list_name, c))
                            for c in self.carries]
            self.list_name = block.list_name
        lst = block.list_name
        calib, self.carries = self._calibrate(
            fp, [{"carry": c} for c in self.carries],
            lambda m, carry: self.runner.block(m, lst, carry), prefix=block.name)
        return calib

    def finish(self, shell: Any) -> Calibration:
        """Statistics of the layers outside the blocks: the embedders' (from `start`) and the
        head's, run on the last block's outputs."""
        head, _ = self._calibrate(shell, [{"carry": c} for c in self.carries],
                                  lambda m, carry: self.runner.head(m, carry))
        return {**self.shell_calib, **head}
