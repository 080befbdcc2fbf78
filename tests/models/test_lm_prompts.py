"""SANA's and Z-Image's prompt paths against diffusers' own pipelines' encode_prompt.

Tiny tokenizers are trained here with the `tokenizers` library in the layout of the real ones
(Gemma: SentencePiece-style BPE with byte fallback and a `<bos>` post-processor; Qwen:
byte-level BPE with a Qwen3-style chat template) and loaded by transformers, as the pipelines
do, and by `LMTokenizer`, without transformers. Ids and masks must be identical (token ids are
integers); embeddings within 1e-4 of the output scale (float32 parity, as in test_causal_lm).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")
tokenizers = pytest.importorskip("tokenizers")

import convert  # noqa: E402
from pqjax.models import lm_prompts  # noqa: E402
from pqjax.models.lm_tokenizer import LMTokenizer  # noqa: E402
from tests.parity import assert_close_rel, randomize_  # noqa: E402

CORPUS = [
    *lm_prompts.SANA_COMPLEX_HUMAN_INSTRUCTION,
    "a red fox jumping over a lazy dog in the snow", "an astronaut riding a horse on mars",
    "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
]
PROMPTS = ["A Red Fox in the snow ", "an astronaut", "A cat sleeping on a mat, photorealistic"]
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


def _train(tok, specials, vocab_size=300):
    from tokenizers import trainers

    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    return tok


@pytest.fixture(scope="module")
def gemma_tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, normalizers, processors

    folder = tmp_path_factory.mktemp("gemma_tok")
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    _train(tok, ["<pad>", "<eos>", "<bos>", "<unk>"])
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": True,
        "add_eos_token": False, "padding_side": "left", "model_max_length": 8192}))
    return folder


@pytest.fixture(scope="module")
def qwen_tokenizer(tmp_path_factory):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    folder = tmp_path_factory.mktemp("qwen_tok")
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    split = Regex(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                  r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(split, behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    from tokenizers import trainers

    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "bos_token": None, "unk_token": None,
        "model_max_length": 131072, "chat_template": QWEN_TEMPLATE}))
    return folder


def _text_model(kind: str, vocab: int, folder):
    base = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=0)
    torch.manual_seed(0)
    if kind == "gemma2":
        model = transformers.Gemma2Model(transformers.Gemma2Config(
            **base, sliding_window=16, query_pre_attn_scalar=8, attn_logit_softcapping=5.0))
    else:
        model = transformers.Qwen3Model(transformers.Qwen3Config(**base))
    randomize_(model.eval(), std=0.2)
    model.save_pretrained(folder)
    return model


def test_tokenizers_match_transformers(gemma_tokenizer, qwen_tokenizer):
    for folder in (gemma_tokenizer, qwen_tokenizer):
        ref = transformers.AutoTokenizer.from_pretrained(folder)
        ref.padding_side = "right"
        ours = LMTokenizer.load(folder)
        texts = [*PROMPTS, CORPUS[0] * 3]  # the last one is truncated
        want = ref(texts, padding="max_length", max_length=40, truncation=True)
        ids, mask = ours(texts, max_length=40)
        np.testing.assert_array_equal(ids, np.asarray(want.input_ids))
        np.testing.assert_array_equal(mask, np.asarray(want.attention_mask))
        assert ours.encode(PROMPTS[0]) == ref.encode(PROMPTS[0])
    ref = transformers.AutoTokenizer.from_pretrained(qwen_tokenizer)
    msgs = [{"role": "user", "content": "a cat"}]
    for thinking in (True, False):
        assert LMTokenizer.load(qwen_tokenizer).apply_chat_template(
            msgs, add_generation_prompt=True, enable_thinking=thinking) == ref.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=True, enable_thinking=thinking)


@pytest.mark.parametrize("chi", [True, False])
def test_sana_encode_prompt_matches_diffusers(gemma_tokenizer, tmp_path, chi):
    vocab = LMTokenizer.load(gemma_tokenizer).backend.get_vocab_size()
    tmodel = _text_model("gemma2", vocab, tmp_path / "te")
    pipe = diffusers.SanaPipeline(
        tokenizer=transformers.AutoTokenizer.from_pretrained(gemma_tokenizer),
        text_encoder=tmodel, vae=None, transformer=None, scheduler=None)
    instruction = list(lm_prompts.SANA_COMPLEX_HUMAN_INSTRUCTION) if chi else None
    with torch.no_grad():
        want = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True, negative_prompt="",
                                  max_sequence_length=24, complex_human_instruction=instruction)
    got = lm_prompts.sana_encode_prompt(
        PROMPTS, convert.load_model(tmp_path / "te"), LMTokenizer.load(gemma_tokenizer),
        max_sequence_length=24, complex_human_instruction=instruction)
    for g, w, what in zip(got, want, ["embeds", "mask", "negative", "negative mask"]):
        w = w.float().numpy()
        assert g.shape == w.shape, what
        if "mask" in what:
            np.testing.assert_array_equal(np.asarray(g), w, err_msg=what)
        else:
            assert_close_rel(np.asarray(g), w, 1e-4, what)


def test_zimage_encode_prompt_matches_diffusers(qwen_tokenizer, tmp_path):
    vocab = LMTokenizer.load(qwen_tokenizer).backend.get_vocab_size()
    tmodel = _text_model("qwen3", vocab, tmp_path / "te")
    pipe = diffusers.ZImagePipeline(
        tokenizer=transformers.AutoTokenizer.from_pretrained(qwen_tokenizer),
        text_encoder=tmodel, vae=None, transformer=None, scheduler=None)
    with torch.no_grad():
        want = pipe._encode_prompt(list(PROMPTS), device=torch.device("cpu"),
                                   max_sequence_length=40)
    feats, lengths = lm_prompts.zimage_encode_prompt(
        PROMPTS, convert.load_model(tmp_path / "te"), LMTokenizer.load(qwen_tokenizer),
        max_sequence_length=40)
    assert [len(w) for w in want] == list(lengths)
    for i, w in enumerate(want):
        assert_close_rel(np.asarray(feats[i, : lengths[i]]), w.float().numpy(), 1e-4, f"{i}")
        assert not np.asarray(feats[i, lengths[i]:]).any()  # padding rows are zero


def test_tokenizer_errors(tmp_path, gemma_tokenizer):
    from pqjax.errors import CheckpointError

    with pytest.raises(CheckpointError, match="tokenizer.json: missing"):
        LMTokenizer.load(tmp_path)
    with pytest.raises(CheckpointError, match="has no chat_template"):
        LMTokenizer.load(gemma_tokenizer).apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        LMTokenizer.load(gemma_tokenizer)(["a"], max_length=0)
    with pytest.raises(TypeError, match="prompts must be a string"):
        lm_prompts.sana_prompt_ids(LMTokenizer.load(gemma_tokenizer), [])
