"""The decoder LMs' tokenizers from the files `save_pretrained` writes, without transformers.

A tokenizer folder (SANA's and Z-Image's `tokenizer/`) holds `tokenizer.json` (the whole
pipeline: normalizer, pre-tokenizer, BPE model and the post-processor that adds special
tokens, read by the `tokenizers` library), `tokenizer_config.json` (special tokens, the chat
template) and, from transformers 5 on, `chat_template.jinja`. Padding is to the right with the
pad token, truncation at `max_length`, as diffusers' SANA and Z-Image pipelines ask for.

    tok = LMTokenizer.load("Sana_1600M_1024px_diffusers/tokenizer")
    ids, mask = tok(["a cat"], max_length=300)           # (batch, 300) int32, 0/1 mask
    text = tok.apply_chat_template([{"role": "user", "content": "a cat"}],
                                   add_generation_prompt=True, enable_thinking=True)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from pqjax.errors import CheckpointError

SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json writes a special token as a string or as an AddedToken dict.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


@dataclasses.dataclass(frozen=True)
class LMTokenizer:
    """A `tokenizers.Tokenizer` with the special tokens and chat template of its folder."""

    backend: Any
    special: dict[str, str]
    chat_template: str | None
    source: str

    @classmethod
    def load(cls, folder: str | Path) -> LMTokenizer:
        from tokenizers import Tokenizer

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (a tokenizer folder needs tokenizer.json, "
                                  "as transformers' save_pretrained writes it)")
        try:
            backend = Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust error types are not exported
            raise CheckpointError(f"{path}: not a tokenizers file ({e})") from e
        config_path = folder / "tokenizer_config.json"
        config: dict[str, Any] = {}
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{config_path}: not valid JSON ({e})") from e
            if not isinstance(config, dict):
                raise CheckpointError(f"{config_path}: must hold a JSON object")
        special = {k: t for k in SPECIAL_TOKENS if (t := _token_text(config.get(k)))}
        template = config.get("chat_template")
        jinja = folder / "chat_template.jinja"
        if jinja.is_file():
            template = jinja.read_text()
        if template is not None and not isinstance(template, str):
            raise CheckpointError(f"{config_path}: chat_template must be a string (named "
                                  "templates are not supported)")
        return cls(backend, special, template, str(folder))

    @property
    def pad_id(self) -> int:
        pad = self.special.get("pad_token")
        pid = None if pad is None else self.backend.token_to_id(pad)
        if pid is None:
            raise CheckpointError(f"{self.source}: no pad_token in tokenizer_config.json that "
                                  "the vocabulary knows; padding needs one")
        return pid

    def encode(self, text: str) -> list[int]:
        """Ids of one text, special tokens included (transformers' `tokenizer.encode`)."""
        return self.backend.encode(text).ids

    def __call__(self, texts: Sequence[str], *, max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """ids `(batch, max_length)` int32 and mask `(batch, max_length)` int32 (1 = token):
        special tokens added, truncated to `max_length`, right-padded with the pad token."""
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        backend = self.backend
        backend.enable_truncation(max_length)
        backend.enable_padding(direction="right", pad_id=self.pad_id,
                               pad_token=self.special["pad_token"], length=max_length)
        try:
            encs = backend.encode_batch(list(texts))
        finally:  # `encode` stays unpadded and untruncated
            backend.no_padding()
            backend.no_truncation()
        ids = np.asarray([e.ids for e in encs], np.int32)
        mask = np.asarray([e.attention_mask for e in encs], np.int32)
        return ids, mask

    def apply_chat_template(self, messages: list[dict[str, str]], **kwargs: Any) -> str:
        """The folder's Jinja chat template rendered as transformers renders it (sandboxed,
        trim_blocks, lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a
        non-escaping `tojson`), with the special tokens as variables."""
        if self.chat_template is None:
            raise CheckpointError(f"{self.source}: the tokenizer has no chat_template")
        return _compile(self.chat_template).render(messages=messages, **self.special, **kwargs)


def _compile(template: str) -> Any:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
