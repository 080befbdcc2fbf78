"""FLUX tokenizers loaded from a pipeline folder, and encode_prompt vs FluxPipeline.encode_prompt.

Tiny tokenizers are built locally in the published FLUX.1 layout: `tokenizer/` holds a
hand-written byte-level BPE (vocab.json + merges.txt, no tokenizer.json), `tokenizer_2/` a small
Unigram saved by T5TokenizerFast (tokenizer.json).
"""

from __future__ import annotations

import json
import logging
import string
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

import convert  # noqa: E402
from pqjax.models import tokenizers as tok  # noqa: E402
from tests.models.test_clip import save_published, tiny_clip  # noqa: E402
from tests.models.test_t5 import tiny_t5  # noqa: E402
from tests.parity import assert_close_rel  # noqa: E402

PROMPTS = ["The cat and the dog!", "a photo of 3 dogs", ""]
LONG = " ".join(["the cat"] * 60)  # > 77 CLIP tokens and > 16 T5 tokens


def write_clip_tokenizer(folder: Path) -> int:
    """Byte-level BPE over letters, digits, some punctuation and a few merges; returns vocab size.

    Special tokens come last, as in CLIP (49406, 49407): EOS has the largest id.
    """
    folder.mkdir(parents=True)
    chars = [*string.ascii_lowercase, *string.digits, *".,!?'-"]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("t", "h"),
              ("th", "e</w>"), ("a", "n"), ("an", "d</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**special, "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}))
    return len(vocab)


def write_t5_tokenizer(folder: Path) -> int:
    """A small Unigram (T5 layout: <pad>=0, </s>=1, <unk>=2), 4 sentinels; returns vocab size."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{w}", -1.0) for w in ("the", "cat", "and", "a", "photo", "of", "dog")]
    pieces += [(c, -4.0) for c in string.ascii_lowercase + string.digits + "!.,"]
    t5_tok = transformers.T5TokenizerFast(vocab=pieces, extra_ids=4, model_max_length=512)
    t5_tok.save_pretrained(folder)
    return len(t5_tok)


@pytest.fixture(scope="module")
def flux_root(tmp_path_factory) -> tuple[Path, int, int]:
    """A FLUX-shaped pipeline folder with the two tiny tokenizers and model_index.json."""
    root = tmp_path_factory.mktemp("flux")
    clip_vocab = write_clip_tokenizer(root / "tokenizer")
    t5_vocab = write_t5_tokenizer(root / "tokenizer_2")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "FluxPipeline",
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
    }))
    return root, clip_vocab, t5_vocab


def reference_ids(tokenizer, prompts, max_length):
    return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                     return_tensors="np").input_ids


def test_ids_match_transformers(flux_root):
    root, _, _ = flux_root
    toks = tok.load_tokenizers(root)
    ref_clip = transformers.CLIPTokenizer.from_pretrained(root / "tokenizer")
    ref_t5 = transformers.T5TokenizerFast.from_pretrained(root / "tokenizer_2")
    clip_ids = tok.clip_input_ids(toks.clip, PROMPTS)
    np.testing.assert_array_equal(clip_ids, reference_ids(ref_clip, PROMPTS, 77))
    bos, eos = ref_clip.bos_token_id, ref_clip.eos_token_id
    assert clip_ids.shape == (3, 77) and eos == clip_ids.max()
    # [BOS, tokens, EOS, EOS padding...]: "the cat and the dog !" is 6 tokens
    assert list(clip_ids[0, :8]) == [bos, *clip_ids[0, 1:7], eos] and (clip_ids[0, 7:] == eos).all()
    assert list(clip_ids[2, :2]) == [bos, eos]
    for length in (512, 256):
        t5_ids = tok.t5_input_ids(toks.t5, PROMPTS, length)
        np.testing.assert_array_equal(t5_ids, reference_ids(ref_t5, PROMPTS, length))
        assert t5_ids.shape == (3, length)
    t5_ids = tok.t5_input_ids(toks.t5, PROMPTS, 256)
    n = int((t5_ids[1] != 0).sum())  # tokens, then </s>=1, then <pad>=0
    assert t5_ids[1, n - 1] == 1 and (t5_ids[1, n:] == 0).all() and t5_ids[2, 0] == 1


def test_truncation_keeps_eos_and_warns(flux_root, caplog):
    toks = tok.load_tokenizers(flux_root[0])
    with caplog.at_level(logging.WARNING, logger=tok.__name__):
        clip_ids = tok.clip_input_ids(toks.clip, [LONG, "a cat"])
        t5_ids = tok.t5_input_ids(toks.t5, [LONG], 16)
    assert clip_ids.shape == (2, 77) and clip_ids[0, -1] == toks.clip.eos_token_id
    assert t5_ids.shape == (1, 16) and t5_ids[0, -1] == 1 and (t5_ids[0] != 0).all()
    assert "CLIP: 1 of 2 prompts truncated" in caplog.text and "T5: 1 of 1" in caplog.text


def test_bad_input(flux_root, tmp_path):
    root = flux_root[0]
    toks = tok.load_tokenizers(root)
    with pytest.raises(ValueError, match="max_sequence_length"):
        tok.t5_input_ids(toks.t5, ["a"], 513)
    with pytest.raises(TypeError, match="prompts"):
        tok.clip_input_ids(toks.clip, [1, 2])
    (tmp_path / "tokenizer").symlink_to(root / "tokenizer")
    with pytest.raises(FileNotFoundError, match="tokenizer_2"):
        tok.load_tokenizers(tmp_path)
    (tmp_path / "tokenizer_2").symlink_to(root / "tokenizer_2")
    (tmp_path / "model_index.json").write_text(json.dumps({"tokenizer": ["x", "EvilTokenizer"]}))
    with pytest.raises(ValueError, match="EvilTokenizer"):
        tok.load_tokenizers(tmp_path)


def test_tokenizing_does_not_import_torch(flux_root):
    code = (
        "import sys\n"
        "from pqjax.models import tokenizers as t\n"
        f"toks = t.load_tokenizers({str(flux_root[0])!r})\n"
        "t.clip_input_ids(toks.clip, ['a cat']); t.t5_input_ids(toks.t5, ['a cat'], 256)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    cwd = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize(
    ("max_sequence_length", "num_images_per_prompt", "prompts_2"),
    [(512, 1, None), (256, 2, ["dogs and cats", "the photo", "cat"])],
)
def test_encode_prompt_matches_flux_pipeline(
    flux_root, tmp_path, max_sequence_length, num_images_per_prompt, prompts_2
):
    root, clip_vocab, t5_vocab = flux_root
    # FLUX's CLIP config: eos_token_id 2, so pooling takes the largest id (<|endoftext|>).
    tclip = tiny_clip(vocab_size=clip_vocab, bos_token_id=clip_vocab - 2, eos_token_id=2,
                      pad_token_id=1)
    tt5 = tiny_t5(vocab_size=t5_vocab, relative_attention_num_buckets=32,
                  relative_attention_max_distance=128)
    save_published(tclip, tmp_path / "text_encoder")
    tt5.save_pretrained(tmp_path / "text_encoder_2")
    pipe = diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None, transformer=None,
        text_encoder=tclip, text_encoder_2=tt5,
        tokenizer=transformers.CLIPTokenizer.from_pretrained(root / "tokenizer"),
        tokenizer_2=transformers.T5TokenizerFast.from_pretrained(root / "tokenizer_2"),
    )
    with torch.no_grad():
        ref_embeds, ref_pooled, ref_text_ids = pipe.encode_prompt(
            PROMPTS, prompt_2=prompts_2, device="cpu",
            num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length,
        )
    embeds, pooled, text_ids = tok.encode_prompt(
        PROMPTS, convert.load_model(tmp_path / "text_encoder"),
        convert.load_model(tmp_path / "text_encoder_2"), tok.load_tokenizers(root),
        max_sequence_length, prompts_2=prompts_2, num_images_per_prompt=num_images_per_prompt,
    )
    b = len(PROMPTS) * num_images_per_prompt
    assert embeds.shape == (b, max_sequence_length, tt5.config.d_model) == ref_embeds.shape
    assert pooled.shape == (b, tclip.config.hidden_size) == ref_pooled.shape
    assert_close_rel(embeds, ref_embeds.numpy(), 1e-4, "prompt_embeds")
    assert_close_rel(pooled, ref_pooled.numpy(), 1e-4, "pooled_prompt_embeds")
    assert text_ids.shape == ref_text_ids.shape == (max_sequence_length, 3)
    assert text_ids.dtype == jnp.float32 and not np.asarray(text_ids).any()
