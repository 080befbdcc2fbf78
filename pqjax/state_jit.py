"""`nnx_jit`: `flax.nnx.jit` that leaves the state a call did not change where it is (a leaf
module).

    encode = nnx_jit(lambda model, ids: model(ids))
    step = nnx_jit(fn, static_argnames=("fwd",))

`nnx.jit` by default hands the module's whole state back from every call, so every weight was
copied at each call: T5-XXL's encoding held its 9.5 GB of weights twice, and each block of a
calibration was copied once per batch. Without graph updates (where flax has the switch), only
the variables the program writes come back (calibration statistics still do).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any


def nnx_jit(fn: Callable[..., Any] | None = None, **kwargs: Any) -> Any:
    """`flax.nnx.jit(fn, **kwargs)` without graph updates; usable as a decorator, with or
    without arguments."""
    from flax import nnx

    if "graph_updates" in inspect.signature(nnx.jit).parameters:
        kwargs.setdefault("graph_updates", False)
    if fn is None:
        return functools.partial(nnx.jit, **kwargs)
    return nnx.jit(fn, **kwargs)
