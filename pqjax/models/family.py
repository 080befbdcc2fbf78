"""One record per model family: everything the rest of pqjax needs to know about a DiT.

    fam = family("flux")                 # by name
    fam = family_of(model)               # by module class (the embedded model is a FLUX)
    [f.name for f in families()]         # ['flux', 'sana', 'zimage']
    fam.sites(model); fam.keep_16bit; fam.block_lists; fam.image_tokens(config, 1024, 1024)
    carry = fam.runner.embed(model, **batch)        # how to run the model one block at a time

Discovery: every module `pqjax/models/<name>_family.py` defines `FAMILY = Family(...)`, found
by name; nothing else lists the families. Adding a model is its model file and one
`<name>_family.py` (README, "Adding a model"), whose `checkpoints` say how its weights are
named (`convert.registry` reads them there).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from pqjax.models.sites import Site
from pqjax.models.spec import ModelSpec


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Static:
    """A hashable Python value (sizes, a patch key) carried between blocks: part of a carry's
    tree structure, not a leaf, so a jitted block sees it as a constant."""

    value: Any


Carry = dict[str, Any]  # what flows between blocks: arrays, tuples of arrays, Static values


@dataclasses.dataclass(frozen=True)
class Runner:
    """How to run a transformer one block at a time (every function traceable by jit).

    embed(model, **inputs) -> carry: the model's inputs (its calibration batches' keywords)
    to what the first block reads; only the layers outside the block lists run. block(block,
    list_name, carry) -> carry: one block of list `list_name`. enter(list_name, carry) ->
    carry: what happens before the first block of a list (Z-Image joins image and caption
    tokens before its main layers). head(model, carry) -> the model's output, from the last
    block's carry. `embed`, the blocks in order and `head` compute the model's own forward.
    """

    embed: Callable[..., Carry]
    block: Callable[[nnx.Module, str, Carry], Carry]
    head: Callable[[nnx.Module, Carry], Any]
    enter: Callable[[str, Carry], Carry] = lambda list_name, carry: carry


@dataclasses.dataclass(frozen=True)
class FamilyMemory:
    """What sets a transformer family's activation memory at a resolution.

    pixels_per_token: image pixels per token along each axis (autoencoder downscale x patch);
    text_tokens: the pipeline's default caption length; mlp_live: channels per token of the
    widest feed-forward intermediate; joint: text tokens share the image tokens' sequence
    (else they enter by cross-attention); softmax_self_attention: False for linear attention
    (no token x token scores). The blocks are the record's `Family.block_lists`.
    """

    dim: int
    heads: int
    pixels_per_token: int
    text_tokens: int
    mlp_live: int
    joint: bool
    softmax_self_attention: bool
    notes: str

    def image_tokens(self, height: int, width: int) -> int:
        return (height // self.pixels_per_token) * (width // self.pixels_per_token)


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family's record.

    model_class: the NNX transformer; config_class: its config dataclass. checkpoints: how
    its diffusers checkpoints map onto it (`pqjax.models.spec.ModelSpec`: the `_class_name`,
    config parsing, key renames, block counts), read by `convert.registry`.
    pipelines: ((`model_index.json` class, "module:function"), ...): the loader
    `fn(root, dtype, *, allow_pickle, max_memory) -> Pipeline` of each pipeline class (named,
    not imported: pipelines sit above the models).
    components: ((pipeline subfolder, checkpoint class), ...): the diffusers pipeline's
    weight folders, each read by the key map of its class (`convert.keymaps`, where diffusers'
    and transformers' names meet the NNX state) with the same streaming safetensors reader.
    sites: `fn(model) -> [Site]`, the permutation sites (`permute.sites`).
    keep_16bit: (path glob, why) for the Linears that stay 16-bit by default.
    block_lists: the attributes holding the transformer blocks, in execution order.
    memory: `fn(config, preset) -> FamilyMemory` (the preset sets only the default caption
    length; "" for a config of no preset); presets: {name: {component: config}}, the
    released checkpoints' configs (`estimate_memory`), built on first use.
    saved_parts: ((class name, "module:class"), ...): the pipeline parts besides the
    transformer that a pqjax checkpoint of this family holds, each with `save(folder)` and
    `load(folder)` (or a whole-pipeline `save_parts` / `load_parts`); named, not imported.
    runner: how to run the model one block at a time (`Runner`), which the quantization
    engine (`pqjax.engine`) uses to calibrate and quantize block by block.
    cross_block_layers: path globs of the Linears that read a site spanning blocks (FLUX's
    temb, SANA's caption norm, Z-Image's t-embedding); the engine quantizes them after the
    blocks, all at once, and `estimate_memory` sizes that step from them without building a
    module (tests/models/test_family.py holds them equal to the sites').
    """

    name: str
    model_class: type
    config_class: type
    checkpoints: tuple[ModelSpec, ...]
    pipelines: tuple[tuple[str, str], ...]
    components: tuple[tuple[str, str], ...]
    sites: Callable[[nnx.Module], list[Site]]
    keep_16bit: tuple[tuple[str, str], ...]
    block_lists: tuple[str, ...]
    memory: Callable[[Any, str], FamilyMemory]
    presets: Callable[[], dict[str, dict[str, Any]]]
    runner: Runner | None = None
    cross_block_layers: tuple[str, ...] = ()
    saved_parts: tuple[tuple[str, str], ...] = ()

    @property
    def checkpoint_classes(self) -> tuple[str, ...]:
        """The diffusers `_class_name`s of this family's transformer checkpoints."""
        return tuple(spec.class_name for spec in self.checkpoints)

    def image_tokens(self, config: Any, height: int, width: int) -> int:
        """Image tokens the transformer sees for a `height` x `width` image."""
        return self.memory(config, "").image_tokens(height, width)

    def blocks(self, model: nnx.Module) -> list[tuple[str, nnx.Module]]:
        """(path, block) for every transformer block of `model`, in execution order."""
        return [(f"{lst}.{i}", block) for lst in self.block_lists
                for i, block in enumerate(getattr(model, lst))]

    def pipeline_loader(self, class_name: str) -> Callable[..., Any]:
        """The loader of `model_index.json` class `class_name`."""
        module, fn = dict(self.pipelines)[class_name].split(":")
        return getattr(importlib.import_module(module), fn)


@functools.cache
def families() -> tuple[Family, ...]:
    """Every family record, sorted by name (the `*_family` modules of `pqjax.models`)."""
    import pqjax.models as models

    found = []
    for info in pkgutil.iter_modules(models.__path__):
        if info.name.endswith("_family"):
            record = getattr(importlib.import_module(f"pqjax.models.{info.name}"), "FAMILY", None)
            if not isinstance(record, Family):
                raise TypeError(f"pqjax/models/{info.name}.py must define FAMILY = Family(...)")
            found.append(record)
    return tuple(sorted(found, key=lambda f: f.name))


def family(name: str) -> Family:
    """The family record called `name` ("flux", "sana", "zimage")."""
    for record in families():
        if record.name == name:
            return record
    raise KeyError(f"no model family {name!r}; known: {[f.name for f in families()]}")


def family_of(model: Any) -> Family | None:
    """The record of `model`'s class (or a class it derives from), or None."""
    cls = model if isinstance(model, type) else type(model)
    for base in cls.__mro__:
        for record in families():
            if record.model_class is base:
                return record
    return None


def family_of_pipeline(class_name: str) -> Family | None:
    """The record whose pipeline loader reads `model_index.json` class `class_name`."""
    return next((f for f in families() if class_name in dict(f.pipelines)), None)


def family_of_preset(preset: str) -> Family | None:
    """The record that holds the released checkpoint preset `preset` ("flux-dev", ...)."""
    return next((f for f in families() if preset in f.presets()), None)
