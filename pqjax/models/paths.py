"""Dotted paths into an NNX module tree, as permutation sites and quantization plans name them.

    norm = module_at(model, "transformer_blocks.0.norm1.norm")   # list indices are integers
"""

from __future__ import annotations

from typing import Any

from flax import nnx


def module_at(model: nnx.Module, path: str) -> Any:
    """The submodule (or attribute) at dotted `path`; list indices are integers."""
    node: Any = model
    for part in path.split("."):
        try:
            node = node[int(part)] if part.isdigit() else getattr(node, part)
        except (AttributeError, IndexError, KeyError, TypeError) as e:
            raise KeyError(f"{type(model).__name__} has no {path!r} (failed at {part!r})") from e
    return node
