"""The tiny model's text encoder: a learned prompt table (pqjax.models.text_table)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pqjax.models.text_table import PromptTable


@pytest.fixture(scope="module")
def table() -> PromptTable:
    return PromptTable(10, tokens=7, joint_dim=12, pooled_dim=5, rngs=nnx.Rngs(3))


@pytest.mark.parametrize(
    "prompt, row",
    [
        ("a handwritten digit 7", 7),
        ("A  Handwritten Digit 7.", 7),
        ("handwritten digit 0", 0),
        ("digit 3", 3),
        ("9", 9),
        ("seven", 7),
        ("digit zero", 0),
        ("a handwritten digit two", 2),
        ("", 10),
        ("   ", 10),
    ],
)
def test_index_accepts_the_documented_forms(table, prompt, row):
    assert table.index(prompt) == row


@pytest.mark.parametrize("prompt", ["a cat", "digit 10", "12", "digit", "a digit 7", "eleven"])
def test_index_rejects_other_prompts_listing_accepted_forms(table, prompt):
    with pytest.raises(ValueError, match="accepted forms") as info:
        table.index(prompt)
    assert '"a handwritten digit 7"' in str(info.value) and '"seven"' in str(info.value)


def test_index_rejects_non_strings(table):
    with pytest.raises(TypeError):
        table.index(7)


def test_fewer_classes_reject_unknown_digits():
    small = PromptTable(3, tokens=2, joint_dim=4, pooled_dim=2, rngs=nnx.Rngs(0))
    assert small.index("two") == 2 and small.index("") == 3
    with pytest.raises(ValueError, match="0..2"):
        small.index("digit 5")
    assert small.prompts == ["a handwritten digit 0", "a handwritten digit 1",
                             "a handwritten digit 2", ""]


def test_encode_shapes_and_rows(table):
    embeds, pooled, txt_ids = table.encode(["a handwritten digit 7", "", "seven"])
    assert embeds.shape == (3, 7, 12) and embeds.dtype == jnp.float32
    assert pooled.shape == (3, 5)
    assert txt_ids.shape == (7, 3) and not np.asarray(txt_ids).any()
    np.testing.assert_array_equal(embeds[0], table.encoder_hidden_states[...][7])
    np.testing.assert_array_equal(embeds[1], table.encoder_hidden_states[...][10])
    np.testing.assert_array_equal(embeds[0], embeds[2])
    np.testing.assert_array_equal(pooled[1], table.pooled_projections[...][table.null_index])
    single, _, _ = table.encode("digit 1")  # one prompt as a plain string
    assert single.shape == (1, 7, 12)


def test_save_load_round_trip(table, tmp_path):
    table.save(tmp_path)
    meta = json.loads((tmp_path / "prompts.json").read_text())
    assert meta["prompts"][7] == "a handwritten digit 7" and meta["prompts"][-1] == ""
    assert not list(tmp_path.glob("*.tmp"))
    loaded = PromptTable.load(tmp_path)
    assert loaded.n_classes == 10 and loaded.tokens == 7
    for name in ("encoder_hidden_states", "pooled_projections"):
        np.testing.assert_array_equal(getattr(loaded, name)[...], getattr(table, name)[...])
    for a, b in zip(loaded.encode(["3", ""]), table.encode(["3", ""])):
        np.testing.assert_array_equal(a, b)


def test_load_errors(table, tmp_path):
    with pytest.raises(FileNotFoundError, match="PromptTable"):
        PromptTable.load(tmp_path)
    table.save(tmp_path)
    meta = json.loads((tmp_path / "prompts.json").read_text())
    (tmp_path / "prompts.json").write_text(json.dumps({**meta, "tokens": 4}))
    with pytest.raises(ValueError, match="do not match"):
        PromptTable.load(tmp_path)
