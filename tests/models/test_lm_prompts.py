"""SANA's and Z-Image's prompt paths against diffusers' own pipelines' encode_prompt.

Tiny tokenizers in the layout of the real ones (tests/models/lm_tokenizers.py) are loaded by
transformers, as the pipelines do, and by `LMTokenizer`, without transformers. Ids and masks
must be identical (token ids are integers); embeddings within 1e-4 of the output scale
(float32 parity, as in test_causal_lm).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")
tokenizers = pytest.importorskip("tokenizers")

import convert  # noqa: E402
from pqjax.models import lm_prompts  # noqa: E402
from pqjax.models.lm_tokenizer import LMTokenizer  # noqa: E402
from tests.models.lm_tokenizers import (  # noqa: E402
    CORPUS,
    write_gemma_tokenizer,
    write_qwen_tokenizer,
)
from tests.parity import assert_close_rel, randomize_  # noqa: E402

PROMPTS = ["A Red Fox in the snow ", "an astronaut", "A cat sleeping on a mat, photorealistic"]


@pytest.fixture(scope="module")
def gemma_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gemma_tok")
    write_gemma_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def qwen_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen_tok")
    write_qwen_tokenizer(folder)
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
