"""A transformer run one block at a time: from its checkpoint, or from memory.

    model = StreamedModel(CheckpointSource("flux-dev"))    # loads the embedders only
    out = model(hidden_states=x, ...)                      # the model's own forward
    pipe = load_pipeline("flux-dev", transformer=model)    # samplers run it step by step
    model = StreamedModel(ModelSource(qmodel))             # a quantized model, block by block

Each call takes every block in turn (read from disk, or from the model), runs it (jitted, one
program per block shape) and drops it, so memory holds the embedders, one block's weights
and temporaries, and the activations. The pipelines' samplers see `eager` and run their loop
step by step in Python instead of in one jit; that is how `convert_and_quantize` gets
calibration trajectories of a model larger than memory, and how a pipeline samples with a
quantized transformer under a memory budget (`pqjax.engine.result.StoredModel`).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import jax
from flax import nnx

from pqjax.models.family import Carry
from pqjax.state_jit import nnx_jit


@functools.partial(nnx_jit, static_argnames=("fn",))
def _embed(shell: nnx.Module, inputs: dict[str, Any], *, fn: Any) -> Carry:
    return fn(shell, **inputs)


@functools.partial(nnx_jit, static_argnames=("fn", "list_name"))
def _block(block: nnx.Module, carry: Carry, *, fn: Any, list_name: str) -> Carry:
    return fn(block, list_name, carry)


@functools.partial(jax.jit, static_argnames=("fn", "list_name"))
def _enter(carry: Carry, *, fn: Any, list_name: str) -> Carry:
    return fn(list_name, carry)


@functools.partial(nnx_jit, static_argnames=("fn",))
def _head(shell: nnx.Module, carry: Carry, *, fn: Any) -> Any:
    return fn(shell, carry)


class StreamedModel:
    """The transformer of `source` (`pqjax.engine.sources`), callable like the model
    (keywords of its calibration batches: diffusers' forward for FLUX and SANA,
    `forward_batch` for Z-Image), running one block at a time. `config` is the model's."""

    eager = True  # samplers: run the loop in Python, one step at a time

    def __init__(self, source: Any, shell: nnx.Module | None = None):
        self.source = source
        self.runner = source.family.runner
        self.config = source.abstract.config
        self.shell = source.shell() if shell is None else shell
        self._signature = inspect.signature(self.runner.embed)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        bound = self._signature.bind(None, *args, **kwargs)
        inputs: dict[str, Any] = {}
        for name, value in list(bound.arguments.items())[1:]:  # after the model
            kind = self._signature.parameters[name].kind
            inputs.update(value if kind is inspect.Parameter.VAR_KEYWORD else {name: value})
        carry = _embed(self.shell, inputs, fn=self.runner.embed)
        for lst in self.source.family.block_lists:
            carry = _enter(carry, fn=self.runner.enter, list_name=lst)
            for i in range(len(getattr(self.source.abstract, lst))):
                block = self.source.block(f"{lst}.{i}")  # read while the previous one runs
                # then wait for it: dispatch is asynchronous, and a loop that reads faster
                # than blocks compute held many blocks' weights at once (FLUX.1-dev's
                # trajectories: 6.6 to 10 GB of them, sampled from outside)
                carry = _block(block, jax.block_until_ready(carry), fn=self.runner.block,
                               list_name=lst)
                del block
        return _head(self.shell, carry, fn=self.runner.head)

    forward_batch = __call__  # Z-Image's sampler calls this name
