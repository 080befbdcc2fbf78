"""FLUX.1's tokenizers (transformers classes, numpy out, no torch) and `encode_prompt` in JAX.

Mirrors diffusers' `FluxPipeline`: CLIP ids are padded/truncated to the CLIP tokenizer's
`model_max_length` (77), T5 ids to `max_sequence_length` (512 for dev, 256 for schnell, see
`presets_text.MAX_SEQUENCE_LENGTH`); neither encoder gets an attention mask, so T5 attends to
its pad tokens; the CLIP *pooled* output and the T5 *last hidden state* are used.

    toks = load_tokenizers("flux-dev")        # pipeline folder, HF cache entry or short name
    clip = convert.load_model(root / "text_encoder")
    t5 = convert.load_model(root / "text_encoder_2")
    prompt_embeds, pooled, text_ids = encode_prompt(["a cat"], clip, t5, toks, 512)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from convert.resolve import resolve
from pqjax.models.clip import CLIPTextModel
from pqjax.models.t5 import T5EncoderModel
from pqjax.state_jit import nnx_jit

logger = logging.getLogger(__name__)

# transformers tokenizer classes a FLUX model_index.json may name; anything else is refused.
TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast", "T5Tokenizer", "T5TokenizerFast")
DEFAULT_CLASSES = {"tokenizer": "CLIPTokenizer", "tokenizer_2": "T5TokenizerFast"}
# FluxPipeline.check_inputs refuses longer T5 sequences.
MAX_T5_LENGTH = 512
# model_max_length above this means the tokenizer config never set one (transformers' sentinel
# is ~1e30); FluxPipeline would then not truncate at all.
_UNSET_MAX_LENGTH = 1_000_000


@dataclasses.dataclass(frozen=True)
class FluxTokenizers:
    """A pipeline's `tokenizer` (CLIP BPE) and `tokenizer_2` (T5 Unigram): transformers objects."""

    clip: Any
    t5: Any


def _pipeline_root(path_or_name: str | os.PathLike) -> Path:
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        return path
    # A repo id / short name: find the pipeline snapshot through its text encoder folder.
    return resolve(path_or_name, "text_encoder").parent


def _class_name(root: Path, subfolder: str) -> str:
    index = root / "model_index.json"
    if not index.is_file():
        return DEFAULT_CLASSES[subfolder]
    try:
        entry = json.loads(index.read_text()).get(subfolder)
    except json.JSONDecodeError as e:
        raise ValueError(f"{index}: not valid JSON ({e})") from e
    name = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
    if name is None:
        return DEFAULT_CLASSES[subfolder]
    if name not in TOKENIZER_CLASSES:
        raise ValueError(
            f"{index}: {subfolder} is {entry!r}; supported tokenizer classes: {TOKENIZER_CLASSES}"
        )
    return name


def load_tokenizer(root: str | os.PathLike, subfolder: str) -> Any:
    """The transformers tokenizer in `root/subfolder`, of the class model_index.json names."""
    import transformers

    root = Path(root)
    folder = root / subfolder
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder}: missing; a FLUX pipeline folder holds tokenizer/ (CLIP: vocab.json, "
            "merges.txt) and tokenizer_2/ (T5: tokenizer.json and/or spiece.model)"
        )
    cls = getattr(transformers, _class_name(root, subfolder))
    try:
        return cls.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{folder}: cannot load as {cls.__name__}: {e}") from e


def load_tokenizers(path_or_name: str | os.PathLike) -> FluxTokenizers:
    """Both tokenizers of a FLUX pipeline folder, HF cache entry or short name (`flux-dev`)."""
    root = _pipeline_root(path_or_name)
    return FluxTokenizers(clip=load_tokenizer(root, "tokenizer"),
                          t5=load_tokenizer(root, "tokenizer_2"))


def _as_list(prompts: str | Sequence[str], what: str) -> list[str]:
    out = [prompts] if isinstance(prompts, str) else list(prompts)
    if not out or not all(isinstance(p, str) for p in out):
        raise TypeError(f"{what} must be a string or a non-empty sequence of strings")
    return out


def _tokenize(tokenizer: Any, prompts: list[str], max_length: int, what: str) -> np.ndarray:
    ids = tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True,
        return_length=False, return_overflowing_tokens=False, return_tensors="np",
    )["input_ids"]
    # diffusers warns the same way; the result is the truncated ids either way.
    lengths = [len(x) for x in tokenizer(prompts)["input_ids"]]
    cut = sum(n > max_length for n in lengths)
    if cut:
        logger.warning("%s: %d of %d prompts truncated to %d tokens (longest: %d)",
                       what, cut, len(prompts), max_length, max(lengths))
    return np.asarray(ids, np.int64)


def clip_input_ids(tokenizer: Any, prompts: str | Sequence[str]) -> np.ndarray:
    """CLIP ids `(batch, model_max_length)`: BOS, tokens, EOS, then pad (EOS for FLUX)."""
    max_length = int(tokenizer.model_max_length)
    if max_length > _UNSET_MAX_LENGTH:
        raise ValueError(
            "CLIP tokenizer has no model_max_length (set it to 77 in tokenizer_config.json)"
        )
    return _tokenize(tokenizer, _as_list(prompts, "prompts"), max_length, "CLIP")


def t5_input_ids(
    tokenizer: Any, prompts: str | Sequence[str], max_sequence_length: int = MAX_T5_LENGTH
) -> np.ndarray:
    """T5 ids `(batch, max_sequence_length)`: tokens, `</s>`, then `<pad>` (id 0)."""
    if not 1 <= max_sequence_length <= MAX_T5_LENGTH:
        raise ValueError(
            f"max_sequence_length must be in [1, {MAX_T5_LENGTH}], got {max_sequence_length}"
        )
    return _tokenize(tokenizer, _as_list(prompts, "prompts"), max_sequence_length, "T5")


@nnx_jit
def _clip_pooled(model: CLIPTextModel, ids: jax.Array) -> jax.Array:
    return model(ids).pooler_output


@nnx_jit
def _t5_hidden(model: T5EncoderModel, ids: jax.Array) -> jax.Array:
    return model(ids)


def encode_prompt(
    prompts: str | Sequence[str],
    clip: CLIPTextModel,
    t5: T5EncoderModel,
    tokenizers: FluxTokenizers,
    max_sequence_length: int = MAX_T5_LENGTH,
    *,
    prompts_2: str | Sequence[str] | None = None,
    num_images_per_prompt: int = 1,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`FluxPipeline.encode_prompt` in JAX.

    prompts go to CLIP, prompts_2 (default: prompts) to T5. Returns prompt_embeds
    `(b * n, max_sequence_length, t5 d_model)` in T5's dtype, pooled `(b * n, clip hidden)` and
    text_ids zeros `(max_sequence_length, 3)` in CLIP's dtype, where each prompt's rows are
    repeated `n = num_images_per_prompt` times consecutively.
    """
    prompts = _as_list(prompts, "prompts")
    prompts_2 = prompts if prompts_2 is None else _as_list(prompts_2, "prompts_2")
    if len(prompts_2) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(prompts_2)} prompts_2")
    if num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
    pooled = _clip_pooled(clip, jnp.asarray(clip_input_ids(tokenizers.clip, prompts)))
    embeds = _t5_hidden(t5, jnp.asarray(t5_input_ids(tokenizers.t5, prompts_2,
                                                      max_sequence_length)))
    if num_images_per_prompt > 1:
        pooled = jnp.repeat(pooled, num_images_per_prompt, axis=0)
        embeds = jnp.repeat(embeds, num_images_per_prompt, axis=0)
    text_ids = jnp.zeros((embeds.shape[1], 3), pooled.dtype)
    return embeds, pooled, text_ids
