"""Parity of the NNX CLIP text encoder with transformers' CLIPTextModel; config and export."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import convert  # noqa: E402
from convert import bridge  # noqa: E402
from pqjax.models import clip  # noqa: E402
from pqjax.models.configs import ConfigError  # noqa: E402
from pqjax.models.presets_text import FLUX_CLIP_L_CONFIG  # noqa: E402
from tests.parity import assert_close_rel, randomize_  # noqa: E402

VOCAB = 61
BOS, EOS = VOCAB - 2, VOCAB - 1  # like CLIP's 49406 / 49407: the two largest ids
CONFIGS = {
    # FLUX's: quick_gelu and the legacy eos_token_id 2 (pool at the largest id).
    "legacy_eos": dict(hidden_act="quick_gelu", eos_token_id=2, num_attention_heads=3),
    # transformers >= 4.31 configs: pool at the first eos_token_id.
    "eos_rule_gelu": dict(hidden_act="gelu", eos_token_id=EOS, num_attention_heads=4),
}


def tiny_clip(seed: int = 0, **overrides):
    """A random transformers CLIPTextModel (float32, eval)."""
    cfg = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=77, bos_token_id=BOS,
               eos_token_id=EOS, pad_token_id=EOS, projection_dim=32)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg)).eval()
    randomize_(model, std=0.2, seed=seed)
    return model


def save_published(model, folder) -> None:
    """save_pretrained, then the `text_model.` key prefix of transformers 4.x / FLUX.1's files."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(folder)
    path = folder / "model.safetensors"
    tensors = load_file(path)
    save_file({f"text_model.{k}": v for k, v in tensors.items()}, path, metadata={"format": "pt"})


def make_ids(batch: int, seq: int, lengths: list[int], seed: int = 0) -> np.ndarray:
    """Random ids `[BOS, tokens..., EOS, EOS...]`: real length `lengths[i]` incl. BOS/EOS."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, BOS, (batch, seq))
    for i, n in enumerate(lengths):
        ids[i, 0], ids[i, n - 1:] = BOS, EOS
    return ids


def run_both(tmodel, jmodel, ids: np.ndarray, mask: np.ndarray | None):
    with torch.no_grad():
        ref = tmodel(torch.as_tensor(ids), None if mask is None else torch.as_tensor(mask))
    out = jmodel(jnp.asarray(ids), None if mask is None else jnp.asarray(mask))
    return out, ref


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("padding", [False, True])
def test_float32_parity(name, padding, tmp_path):
    tmodel = tiny_clip(**CONFIGS[name])
    save_published(tmodel, tmp_path)
    jmodel = convert.load_model(tmp_path)
    lengths = [13, 5, 9]
    ids = make_ids(3, 13, lengths)  # batch > 1, seq not a power of two
    ids[2, 4] = ids[2, 2] = 7  # a repeated token; the max-id rule must still find EOS
    mask = (np.arange(13)[None] < np.array(lengths)[:, None]).astype(np.int64) if padding else None
    out, ref = run_both(tmodel, jmodel, ids, mask)
    assert_close_rel(out.last_hidden_state, ref.last_hidden_state, 1e-4, f"{name} hidden")
    assert_close_rel(out.pooler_output, ref.pooler_output, 1e-4, f"{name} pooled")


@pytest.mark.parametrize("eos_token_id", [2, EOS])
def test_pooling_rule(eos_token_id, tmp_path):
    """Random ids (EOS absent or repeated): both pooling rules pick transformers' position."""
    tmodel = tiny_clip(eos_token_id=eos_token_id, num_attention_heads=2)
    save_published(tmodel, tmp_path)
    jmodel = convert.load_model(tmp_path)
    ids = np.random.default_rng(1).integers(0, VOCAB, (4, 11))
    ids[0, 3] = ids[0, 6] = EOS  # first of two EOS
    ids[1] = np.minimum(ids[1], BOS - 1)  # no EOS at all: transformers takes position 0
    out, ref = run_both(tmodel, jmodel, ids, None)
    assert_close_rel(out.pooler_output, ref.pooler_output, 1e-4, "pooled")


def test_left_padding_valid_positions(tmp_path):
    """Pad queries before the first real token see no key; valid positions must still agree."""
    tmodel = tiny_clip()
    save_published(tmodel, tmp_path)
    jmodel = convert.load_model(tmp_path)
    ids = make_ids(2, 10, [10, 10])
    mask = np.ones((2, 10), np.int64)
    mask[1, :3] = 0
    out, ref = run_both(tmodel, jmodel, ids, mask)
    valid = mask.astype(bool)
    assert_close_rel(np.asarray(out.last_hidden_state)[valid],
                     ref.last_hidden_state.numpy()[valid], 1e-4, "valid positions")


def test_loads_unprefixed_transformers5_layout(tmp_path):
    """transformers >= 5 save_pretrained drops the `text_model.` prefix."""
    tmodel = tiny_clip()
    tmodel.save_pretrained(tmp_path)
    jmodel = convert.load_model(tmp_path)
    out, ref = run_both(tmodel, jmodel, make_ids(2, 7, [7, 4]), None)
    assert_close_rel(out.pooler_output, ref.pooler_output, 1e-4, "pooled")


def test_export_round_trip(tmp_path):
    tmodel = tiny_clip(**CONFIGS["legacy_eos"])
    save_published(tmodel, tmp_path / "src")
    jmodel = convert.load_model(tmp_path / "src")
    convert.export_model(jmodel, tmp_path / "out")
    back = transformers.CLIPTextModel.from_pretrained(tmp_path / "out").eval()
    raw = json.loads((tmp_path / "out" / "config.json").read_text())
    assert raw["architectures"] == ["CLIPTextModel"] and raw["model_type"] == "clip_text_model"
    assert back.config.eos_token_id == 2 and back.config.hidden_act == "quick_gelu"
    ids = make_ids(2, 9, [9, 6])
    with torch.no_grad():
        a, b = tmodel(torch.as_tensor(ids)), back(torch.as_tensor(ids))
    np.testing.assert_array_equal(a.last_hidden_state.numpy(), b.last_hidden_state.numpy())
    np.testing.assert_array_equal(a.pooler_output.numpy(), b.pooler_output.numpy())
    assert convert.load_model(tmp_path / "out").config == jmodel.config


def test_read_config():
    cfg = clip.read_config(FLUX_CLIP_L_CONFIG, "flux")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.eos_token_id) == (768, 12, 2)
    # what transformers >= 5 writes parses too, and back to the same config
    tcfg = transformers.CLIPTextConfig(**clip.write_config(cfg))
    assert clip.read_config(tcfg.to_dict(), "t5-written") == cfg
    with pytest.raises(ConfigError, match=r"cfg\.json: unsupported config field 'rope_theta'"):
        clip.read_config({**FLUX_CLIP_L_CONFIG, "rope_theta": 1e4}, "cfg.json")
    with pytest.raises(ConfigError, match="hidden_act"):
        clip.read_config({**FLUX_CLIP_L_CONFIG, "hidden_act": "mish"}, "cfg.json")
    with pytest.raises(ConfigError, match="eos_token_id"):
        clip.read_config({**FLUX_CLIP_L_CONFIG, "eos_token_id": [2, 3]}, "cfg.json")
    with pytest.raises(ConfigError, match="clip_text_model"):
        clip.read_config({"model_type": "clip", "text_config": {}}, "cfg.json")


def count_params(model: nnx.Module) -> int:
    leaves = jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
    return sum(int(np.prod(v.shape)) for v in leaves)


def test_clip_l_param_count():
    """FLUX's CLIP-L preset builds abstractly with exactly transformers' parameter count."""
    abstract = nnx.eval_shape(lambda: clip.CLIPTextModel(clip.CLIP_L_FLUX, rngs=nnx.Rngs(0)))
    with torch.device("meta"):
        ref = transformers.CLIPTextModel(
            transformers.CLIPTextConfig(**clip.write_config(clip.CLIP_L_FLUX))
        )
    n_ref = sum(p.numel() for p in ref.parameters())
    assert count_params(abstract) == n_ref
    assert 122e6 < n_ref < 124e6, n_ref
    keys = set(bridge.param_map(abstract))
    assert keys == {f"text_model.{k}" for k in ref.state_dict()} - {
        "text_model.embeddings.position_ids"
    }

