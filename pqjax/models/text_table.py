"""The tiny digits model's text encoder: a learned lookup table, one entry per prompt.

FLUX conditions on T5 token states `(b, 512, 4096)` and a CLIP pooled vector `(b, 768)`.
The embedded tiny model has ten classes, so its "text encoder" is a table trained jointly
with the transformer: row d holds T learned token states and one pooled vector for
"a handwritten digit d", the last row the null (empty) prompt used for classifier-free
guidance. `encode` returns what `FluxPipeline.encode_prompt` returns.

    table = PromptTable.load("pqjax/assets/tiny-flux-digits/text_encoder")
    embeds, pooled, txt_ids = table.encode(["a handwritten digit 7", ""])
    # embeds (2, T, joint_dim), pooled (2, pooled_dim), txt_ids (T, 3) zeros

On disk: `model.safetensors` (`encoder_hidden_states` `(n_classes + 1, T, joint_dim)`,
`pooled_projections` `(n_classes + 1, pooled_dim)`, float32) and `prompts.json` (the prompt
of each row and the accepted spellings).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pqjax.errors import CheckpointError, MissingFileError

WEIGHTS = "model.safetensors"
PROMPTS = "prompts.json"
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ACCEPTED = ('"a handwritten digit 7"', '"handwritten digit 7"', '"digit 7"', '"7"', '"seven"',
            '"" (the null prompt)')


def canonical_prompt(digit: int) -> str:
    return f"a handwritten digit {digit}"


class PromptTable(nnx.Module):
    """Learned conditioning per class plus a null row (the last one).

    encoder_hidden_states: Param `(n_classes + 1, tokens, joint_dim)`;
    pooled_projections: Param `(n_classes + 1, pooled_dim)`.
    """

    def __init__(
        self,
        n_classes: int = 10,
        tokens: int = 8,
        joint_dim: int = 64,
        pooled_dim: int = 32,
        *,
        std: float = 1.0,
        rngs: nnx.Rngs,
    ):
        if not 1 <= n_classes <= len(WORDS):
            raise ValueError(f"n_classes must be in 1..{len(WORDS)} (digits), got {n_classes}")
        k_tok, k_pool = jax.random.split(rngs.params())
        rows = n_classes + 1
        self.n_classes = n_classes
        self.encoder_hidden_states = nnx.Param(
            std * jax.random.normal(k_tok, (rows, tokens, joint_dim), jnp.float32)
        )
        self.pooled_projections = nnx.Param(
            std * jax.random.normal(k_pool, (rows, pooled_dim), jnp.float32)
        )

    @property
    def null_index(self) -> int:
        return self.n_classes

    @property
    def tokens(self) -> int:
        return self.encoder_hidden_states.shape[1]

    @property
    def prompts(self) -> list[str]:
        """The canonical prompt of each row; the null prompt is ""."""
        return [canonical_prompt(d) for d in range(self.n_classes)] + [""]

    def calibration_prompts(self) -> list[str]:
        """The prompts calibration samples with: one canonical prompt per class."""
        return [canonical_prompt(d) for d in range(self.n_classes)]

    def index(self, prompt: str) -> int:
        """Row of `prompt`: "a handwritten digit 7", "digit 7", "7", "seven" -> 7; "" -> null."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        text = " ".join(prompt.lower().split()).rstrip(".")
        if not text:
            return self.null_index
        m = re.fullmatch(r"(?:(?:a )?handwritten )?(?:digit )?(\w+)", text)
        if m:
            name = m.group(1)
            digit = int(name) if name.isdigit() and len(name) == 1 else (
                WORDS.index(name) if name in WORDS else None)
            if digit is not None and digit < self.n_classes:
                return digit
        raise ValueError(
            f"unknown prompt {prompt!r}: this model knows the digits 0..{self.n_classes - 1}; "
            f"accepted forms: {', '.join(ACCEPTED)}"
        )

    def __call__(self, rows: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Traceable lookup. rows `(b,)` int -> embeds `(b, T, joint_dim)`, pooled `(b, pooled)`."""
        return self.encoder_hidden_states[...][rows], self.pooled_projections[...][rows]

    def encode(self, prompts: list[str] | str) -> tuple[jax.Array, jax.Array, jax.Array]:
        """FluxPipeline.encode_prompt's triple: embeds `(b, T, joint)`, pooled `(b, pooled)`,
        txt_ids `(T, 3)` zeros."""
        if isinstance(prompts, str):
            prompts = [prompts]
        rows = jnp.asarray([self.index(p) for p in prompts], jnp.int32)
        embeds, pooled = self(rows)
        return embeds, pooled, jnp.zeros((self.tokens, 3), jnp.float32)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write `model.safetensors` and `prompts.json` into `folder` (each file atomically)."""
        from safetensors.numpy import save_file

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {
            "encoder_hidden_states": np.asarray(self.encoder_hidden_states[...], np.float32),
            "pooled_projections": np.asarray(self.pooled_projections[...], np.float32),
        }
        tmp = out / (WEIGHTS + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, 0o644)  # safetensors creates it owner-only; it is a shareable asset
        os.replace(tmp, out / WEIGHTS)
        meta: dict[str, Any] = {
            "_class_name": "PromptTable",
            "n_classes": self.n_classes,
            "tokens": self.tokens,
            "joint_attention_dim": int(self.encoder_hidden_states.shape[2]),
            "pooled_projection_dim": int(self.pooled_projections.shape[1]),
            "prompts": self.prompts,
            "null_index": self.null_index,
            "accepted_forms": list(ACCEPTED),
        }
        tmp = out / (PROMPTS + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, out / PROMPTS)
        return out

    @classmethod
    def load(cls, folder: str | os.PathLike) -> PromptTable:
        """The table saved by `save`; shapes are checked against `prompts.json`."""
        from safetensors.numpy import load_file

        folder = Path(folder)
        for name in (PROMPTS, WEIGHTS):  # safetensors' FileNotFoundError names no file
            if not (folder / name).is_file():
                raise MissingFileError(f"{folder / name}: missing (a PromptTable folder holds "
                                       f"{PROMPTS} and {WEIGHTS})")
        try:
            meta = json.loads((folder / PROMPTS).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{folder / PROMPTS}: not valid JSON ({e})") from e
        try:
            tensors = load_file(str(folder / WEIGHTS))
        except Exception as e:  # SafetensorError, OSError
            raise CheckpointError(f"{folder / WEIGHTS}: cannot be read ({e})") from e
        emb, pooled = tensors["encoder_hidden_states"], tensors["pooled_projections"]
        rows = meta["n_classes"] + 1
        want_emb = (rows, meta["tokens"], meta["joint_attention_dim"])
        want_pool = (rows, meta["pooled_projection_dim"])
        if emb.shape != want_emb or pooled.shape != want_pool:
            raise ValueError(f"{folder}: tensors {emb.shape}, {pooled.shape} do not match "
                             f"prompts.json {want_emb}, {want_pool}")
        table = nnx.eval_shape(lambda: cls(
            meta["n_classes"], meta["tokens"], meta["joint_attention_dim"],
            meta["pooled_projection_dim"], rngs=nnx.Rngs(0)))
        table.encoder_hidden_states = nnx.Param(jnp.asarray(emb, jnp.float32))
        table.pooled_projections = nnx.Param(jnp.asarray(pooled, jnp.float32))
        return table
