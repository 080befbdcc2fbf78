"""The family records' block runners and the engine's split into stages, on tiny models."""

from __future__ import annotations

import fnmatch

import numpy as np
import pytest
from flax import nnx

import pqjax
from pqjax.calibrate import linears
from pqjax.engine.stages import Stages, under
from pqjax.models.family import family_of
from tests.engine.test_paths_agree import CASES
from tests.engine.tiny import forward
from tests.parity import random_nnx


@pytest.fixture(scope="module", params=sorted(CASES))
def tiny(request) -> tuple[str, nnx.Module, dict]:
    cls, config, batch = CASES[request.param]
    return request.param, random_nnx(cls, config, 0.2), batch(0)


def test_runner_is_the_models_own_forward(tiny):
    """embed, every block in order (entering each list) and head give the model's output.
    Run eagerly, both do the same operations on the same arrays: equal bit for bit."""
    name, model, batch = tiny
    runner = family_of(model).runner
    carry = runner.embed(model, **batch)
    for lst in family_of(model).block_lists:
        carry = runner.enter(lst, carry)
        for block in getattr(model, lst):
            carry = runner.block(block, lst, carry)
    np.testing.assert_array_equal(np.asarray(runner.head(model, carry)),
                                  forward(name, model, batch))


def test_every_linear_belongs_to_one_stage(tiny):
    _, model, _ = tiny
    config = pqjax.QuantConfig(skip=())
    stages = Stages.of(model, config)
    owned = [p for targets in stages.targets.values() for p in targets]
    assert sorted(owned) == sorted(p for p, _ in linears(model))  # once each
    for block in stages.blocks:
        assert all(under(p, block.name) for p in stages.targets[block.name])
        for site in stages.block_sites[block.name]:  # relative to the block: resolvable there
            for path in site.consumers:
                pqjax.permute.module_at(pqjax.permute.module_at(model, block.name), path)


def test_cross_block_layer_patterns_are_the_model_stage_readers(tiny):
    """`Family.cross_block_layers`, which `estimate_memory` sizes the model stage from, names
    exactly the Linears that read a site spanning blocks."""
    _, model, _ = tiny
    stages = Stages.of(model, pqjax.QuantConfig())
    readers = {c for site in stages.model_sites for c in site.consumers}
    paths = [p for p, _ in linears(model)]
    patterns = family_of(model).cross_block_layers
    assert {p for p in paths if any(fnmatch.fnmatchcase(p, pat) for pat in patterns)} == readers
    assert stages.deferred == {r for r in readers if any(under(r, b.name) for b in stages.blocks)}
