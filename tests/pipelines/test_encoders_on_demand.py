"""Text encoders under a memory budget: loaded for each encoding, released before sampling.

`max_memory` below the pipeline's weights keeps the text encoders on disk (`OnDemand`). The
images must be bit-identical to the pipeline that holds its encoders (the same weights run
through the same compiled programs), and no encoder may stay alive after `generate`: a weak
reference to each loaded encoder must be dead once the call returns.
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import pqjax  # noqa: E402
from pqjax.pipelines import components  # noqa: E402
from pqjax.pipelines.components import OnDemand, parse_bytes  # noqa: E402
from tests.pipelines.test_flux_pipeline import tiny_flux_pipeline  # noqa: E402
from tests.pipelines.test_lm_pipelines import PROMPTS, tiny_sana, tiny_zimage  # noqa: E402


@pytest.fixture
def loaded(monkeypatch):
    """Weak references to every model an `OnDemand` loads."""
    refs = []
    real = OnDemand.load

    def load(self):
        model = real(self)
        refs.append(weakref.ref(model))
        return model

    monkeypatch.setattr(OnDemand, "load", load)
    return refs


def _released(refs, n):
    gc.collect()
    assert len(refs) == n and all(r() is None for r in refs), "an encoder stayed in memory"


def test_parse_bytes():
    assert parse_bytes("16GiB") == 16 * 2**30
    assert parse_bytes("24 GB") == 24 * 10**9
    assert parse_bytes(1.5e9) == 1_500_000_000
    assert parse_bytes(None) is None
    for bad in ("lots", "16 GiBs", 0, -1, float("nan"), float("inf"), True, "0GiB"):
        with pytest.raises(ValueError, match="max_memory must be a positive byte count"):
            parse_bytes(bad)


def test_bad_budget_is_refused_before_loading(monkeypatch):
    import convert

    def boom(*a, **k):
        raise AssertionError("loaded something")

    monkeypatch.setattr(convert, "resolve", boom)
    with pytest.raises(ValueError, match="max_memory .* got 'plenty'"):
        pqjax.load_pipeline("tiny-flux-digits", max_memory="plenty")


@pytest.mark.parametrize("kind", ["sana", "zimage"])
def test_lm_pipeline_encoder_released(tmp_path, capsys, loaded, kind):
    (tiny_sana if kind == "sana" else tiny_zimage)(tmp_path)
    folder = tmp_path / kind
    kw = dict(num_steps=2, height=32, width=32, seed=3)
    held = pqjax.load_pipeline(folder)
    assert "text encoders" not in capsys.readouterr().err
    roomy = pqjax.load_pipeline(folder, max_memory="1TiB")  # fits: nothing changes
    assert not isinstance(roomy.text_encoder, OnDemand)
    tight = pqjax.load_pipeline(folder, max_memory=1000)
    assert isinstance(tight.text_encoder, OnDemand)
    err = capsys.readouterr().err
    assert "exceed max_memory" in err and "released before sampling" in err
    want = held.generate(PROMPTS[:2], **kw)
    got = tight.generate(PROMPTS[:2], **kw)
    np.testing.assert_array_equal(got, want)
    _released(loaded, 1)
    # calibration encodes the same way
    batches = tight.calibration_batches(PROMPTS[:1], num_steps=1, height=32, width=32)
    assert batches and batches[0]
    _released(loaded, 2)


def test_flux_encoders_released_and_restored(tmp_path, capsys, loaded):
    tiny_flux_pipeline(tmp_path, guidance_embeds=True)
    folder = tmp_path / "pipe"
    kw = dict(num_steps=2, height=32, width=32, seed=1)
    held = pqjax.load_pipeline(folder)
    tight = pqjax.load_pipeline(folder, max_memory=1000)
    enc = tight.text_encoder
    assert isinstance(enc.clip, OnDemand) and isinstance(enc.t5, OnDemand)
    assert "exceed max_memory" in capsys.readouterr().err
    np.testing.assert_array_equal(tight.generate(["a photo of the cat"], **kw),
                                  held.generate(["a photo of the cat"], **kw))
    _released(loaded, 2)  # CLIP and T5, each loaded once and dropped
    # a saved checkpoint restores the same way
    ckpt = pqjax.save(held, tmp_path / "ckpt")
    back = pqjax.restore(ckpt, max_memory="1KB")
    assert isinstance(back.text_encoder.clip, OnDemand)
    np.testing.assert_array_equal(back.generate(["the dog and a cat"], **kw),
                                  held.generate(["the dog and a cat"], **kw))
    _released(loaded, 4)


def test_estimated_sizes_match_loaded_arrays(tmp_path):
    """`convert.weight_bytes` (headers only) equals the loaded model's array bytes."""
    import convert

    tiny_sana(tmp_path)
    for name in ("text_encoder", "vae", "transformer"):
        model = convert.load_model(tmp_path / "sana" / name)
        assert convert.weight_bytes(tmp_path / "sana" / name) == components.tree_bytes(model)
