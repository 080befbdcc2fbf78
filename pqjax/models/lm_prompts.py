"""SANA's and Z-Image's prompt paths, as diffusers' `SanaPipeline` and `ZImagePipeline` run them.

SANA (`SanaPipeline.encode_prompt`, clean_caption off): each prompt is lower-cased and
stripped; with a complex human instruction (CHI, the pipeline's default) the instruction lines
joined by newlines are prefixed to it and the token budget grows to
`len(encode(instruction)) + max_sequence_length - 2`; Gemma-2's last hidden state is then cut
to the first token and the last `max_sequence_length - 1` positions, and so is the mask. The
negative prompt gets no instruction and no cut.

Z-Image (`ZImagePipeline._encode_prompt`): each prompt becomes a one-message chat rendered by
the tokenizer's template (generation prompt on, thinking on), padded to `max_sequence_length`;
the caption features are Qwen3's `hidden_states[-2]` at the real tokens.

    embeds, mask, neg, neg_mask = sana_encode_prompt(["a cat"], gemma, tok)
    feats, lengths = zimage_encode_prompt(["a cat"], qwen, tok)
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pqjax.models.gemma2 import Gemma2Model
from pqjax.models.lm_tokenizer import LMTokenizer
from pqjax.models.qwen3 import Qwen3Model
from pqjax.state_jit import nnx_jit

# SanaPipeline.__call__'s default complex_human_instruction (diffusers 0.32+).
SANA_COMPLEX_HUMAN_INSTRUCTION: tuple[str, ...] = (
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual "
    "descriptions suitable for image generation. Evaluate the level of detail in the user "
    "prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, "
    "textures, and spatial relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly "
    "without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round "
    "shape, sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red "
    "flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, "
    "featuring glowing street lamps, a diverse crowd of people in colorful clothing, and a "
    "double-decker bus passing by towering glass skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including "
    "any additional commentary or evaluations:",
    "User Prompt: ",
)
SANA_MAX_SEQUENCE_LENGTH = 300
ZIMAGE_MAX_SEQUENCE_LENGTH = 512


def _prompts(prompts: str | Sequence[str], what: str = "prompts") -> list[str]:
    out = [prompts] if isinstance(prompts, str) else list(prompts)
    if not out or not all(isinstance(p, str) for p in out):
        raise TypeError(f"{what} must be a string or a non-empty sequence of strings")
    return out


def sana_prompt_ids(tokenizer: LMTokenizer, prompts: str | Sequence[str], *,
                    max_sequence_length: int = SANA_MAX_SEQUENCE_LENGTH,
                    complex_human_instruction: Sequence[str] | None = (
                        SANA_COMPLEX_HUMAN_INSTRUCTION)) -> tuple[np.ndarray, np.ndarray]:
    """Gemma ids and mask `(batch, L)`: L = max_sequence_length without an instruction, else
    `len(encode(instruction)) + max_sequence_length - 2` (`_get_gemma_prompt_embeds`)."""
    texts = [p.lower().strip() for p in _prompts(prompts)]
    length = max_sequence_length
    if complex_human_instruction:
        chi = "\n".join(complex_human_instruction)
        texts = [chi + t for t in texts]
        length = len(tokenizer.encode(chi)) + max_sequence_length - 2
    return tokenizer(texts, max_length=length)


@nnx_jit
def _last_hidden(model: Gemma2Model, ids: jax.Array, mask: jax.Array) -> jax.Array:
    return model(ids, mask)


def sana_encode_prompt(
    prompts: str | Sequence[str], gemma: Gemma2Model, tokenizer: LMTokenizer, *,
    negative_prompt: str | Sequence[str] | None = "",
    max_sequence_length: int = SANA_MAX_SEQUENCE_LENGTH,
    complex_human_instruction: Sequence[str] | None = SANA_COMPLEX_HUMAN_INSTRUCTION,
) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array | None]:
    """`SanaPipeline.encode_prompt` (one image per prompt). Returns prompt embeds
    `(b, max_sequence_length, d)`, their mask `(b, max_sequence_length)`, and the negative
    prompt's embeds and mask of the same shapes (None when `negative_prompt` is None: no CFG).
    """
    prompts = _prompts(prompts)
    ids, mask = sana_prompt_ids(tokenizer, prompts, max_sequence_length=max_sequence_length,
                                complex_human_instruction=complex_human_instruction)
    hidden = _last_hidden(gemma, jnp.asarray(ids), jnp.asarray(mask))
    length = ids.shape[1]
    keep = np.array([0, *range(length - max_sequence_length + 1, length)])  # first + last n-1
    embeds, emb_mask = hidden[:, keep], jnp.asarray(mask)[:, keep]
    if negative_prompt is None:
        return embeds, emb_mask, None, None
    neg = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else (
        _prompts(negative_prompt, "negative_prompt"))
    if len(neg) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(neg)} negative prompts")
    nids, nmask = sana_prompt_ids(tokenizer, neg, max_sequence_length=max_sequence_length,
                                  complex_human_instruction=None)
    neg_hidden = _last_hidden(gemma, jnp.asarray(nids), jnp.asarray(nmask))
    return embeds, emb_mask, neg_hidden, jnp.asarray(nmask)


def zimage_prompt_ids(tokenizer: LMTokenizer, prompts: str | Sequence[str], *,
                      max_sequence_length: int = ZIMAGE_MAX_SEQUENCE_LENGTH
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Qwen3 ids and mask `(batch, max_sequence_length)` of the chat-formatted prompts."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                           add_generation_prompt=True, enable_thinking=True)
             for p in _prompts(prompts)]
    return tokenizer(texts, max_length=max_sequence_length)


def zimage_encode_prompt(
    prompts: str | Sequence[str], qwen: Qwen3Model, tokenizer: LMTokenizer, *,
    max_sequence_length: int = ZIMAGE_MAX_SEQUENCE_LENGTH,
) -> tuple[jax.Array, np.ndarray]:
    """`ZImagePipeline._encode_prompt`: Qwen3's `hidden_states[-2]` `(b, max_sequence_length,
    d)` zeroed past each prompt's real tokens, and the token counts `(b,)`; prompt i's caption
    features (what the pipeline hands the transformer) are `feats[i, :lengths[i]]`."""
    ids, mask = zimage_prompt_ids(tokenizer, prompts, max_sequence_length=max_sequence_length)
    layer = qwen.config.num_hidden_layers - 1
    hidden = _hidden_state(qwen, jnp.asarray(ids), jnp.asarray(mask), layer)
    # Right padding: the real tokens are a prefix of each row.
    feats = jnp.where(jnp.asarray(mask, bool)[..., None], hidden, 0)
    return feats, mask.sum(axis=1)


@nnx_jit(static_argnums=3)
def _hidden_state(model: Qwen3Model, ids: jax.Array, mask: jax.Array, layer: int) -> jax.Array:
    return model.hidden_state(ids, mask, layer=layer)
