"""Tiny tokenizers in the layout of Gemma-2's and Qwen3's, trained here with `tokenizers`.

Gemma: SentencePiece-style BPE with byte fallback and a `<bos>` post-processor; Qwen: byte-level
BPE with a Qwen3-style chat template. transformers' AutoTokenizer loads both folders, as the
diffusers pipelines do, and so does `pqjax.models.lm_tokenizer.LMTokenizer`.
"""

from __future__ import annotations

import json
from pathlib import Path

from pqjax.models import lm_prompts

CORPUS = [
    *lm_prompts.SANA_COMPLEX_HUMAN_INSTRUCTION,
    "a red fox jumping over a lazy dog in the snow", "an astronaut riding a horse on mars",
    "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
]
# A Qwen3-style template: one user turn, the generation prompt, the thinking switch.
QWEN_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def write_gemma_tokenizer(folder: Path) -> int:
    """A Gemma-style tokenizer folder; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                  special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"])
    tok.train_from_iterator(CORPUS * 20, trainer)
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": True,
        "add_eos_token": False, "padding_side": "left", "model_max_length": 8192}))
    return tok.get_vocab_size()


def write_qwen_tokenizer(folder: Path) -> int:
    """A Qwen2/3-style byte-level tokenizer folder with a chat template; its vocabulary size."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    split = Regex(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                  r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(split, behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "bos_token": None, "unk_token": None,
        "model_max_length": 131072, "chat_template": QWEN_TEMPLATE}))
    return tok.get_vocab_size()
