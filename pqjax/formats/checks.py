"""NaN/Inf detection for traced (jitted) code, via jax.experimental.checkify.

Eager calls of quantize / fake_quant raise ValueError themselves. Under jax.jit the input is not
concrete, so use::

    err, qt = checked_quantize(x, "nvfp4")   # works eagerly and inside jax.jit
    err.throw()                              # raises if x held NaN/Inf; err.get() -> str | None
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from pqjax.formats.base import Format
from pqjax.formats.qtensor import QTensor
from pqjax.formats.registry import get

Array = jax.Array
QUANTIZE_KWARGS = frozenset({"global_scale", "scale"})


def resolve(fmt: str | Format, kwargs: dict[str, Any]) -> tuple[Format, dict[str, Any]]:
    """Split kwargs into format options (for get) and quantize arguments (global_scale, scale)."""
    qkw = {k: v for k, v in kwargs.items() if k in QUANTIZE_KWARGS}
    fkw = {k: v for k, v in kwargs.items() if k not in QUANTIZE_KWARGS}
    return get(fmt, **fkw), qkw


def check_finite(x: Array, name: str) -> None:
    """checkify.check that x is all finite; the message names the format and the count."""
    bad = jnp.count_nonzero(~jnp.isfinite(jnp.asarray(x)))
    safe = name.replace("{", "{{").replace("}", "}}")
    checkify.check(bad == 0, f"{safe}: input has {{bad}} non-finite value(s) (NaN/Inf)", bad=bad)


def checked_quantize(x: Array, fmt: str | Format, **kwargs: Any) -> tuple[checkify.Error, QTensor]:
    """(err, QTensor): quantize with a functional NaN/Inf check usable under jax.jit.

    kwargs: format options (group=, ...) when fmt is a name, and quantize arguments.
    """
    f, qkw = resolve(fmt, kwargs)

    def body(x: Array) -> QTensor:
        check_finite(x, f.name)
        return f.quantize(x, **qkw)

    return checkify.checkify(body)(x)


def checked_fake_quant(
    x: Array, fmt: str | Format, dtype: Any = None, **kwargs: Any
) -> tuple[checkify.Error, Array]:
    """(err, fake-quantized x): like :func:`checked_quantize` for fake_quant."""
    f, qkw = resolve(fmt, kwargs)

    def body(x: Array) -> Array:
        check_finite(x, f.name)
        return f.fake_quant(x, dtype=dtype, **qkw)

    return checkify.checkify(body)(x)
