"""`nnx_jit`: a jitted call on a module leaves the weights it did not change where they are."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from pqjax.models.layers import Linear
from pqjax.state_jit import nnx_jit


class Counter(nnx.Variable):
    pass


class Counted(nnx.Module):
    def __init__(self):
        self.lin = Linear(256, 256, use_bias=False, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
        self.calls = Counter(jnp.zeros((), jnp.int32))

    def __call__(self, x):
        self.calls[...] += 1
        return self.lin(x)


def test_nnx_jit_leaves_unchanged_weights_in_place():
    """A default nnx.jit hands every variable back (a copy of each weight per call); nnx_jit
    returns only what changed: the kernel keeps its buffer, the counter still counts."""
    model = Counted()
    before = model.lin.kernel[...].unsafe_buffer_pointer()
    f = nnx_jit(lambda m, x: m(x))
    for _ in range(2):
        f(model, jnp.ones((2, 256), jnp.bfloat16)).block_until_ready()
    assert model.lin.kernel[...].unsafe_buffer_pointer() == before
    assert int(model.calls[...]) == 2
