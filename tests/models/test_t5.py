"""Parity of the NNX T5 encoder with transformers' T5EncoderModel; buckets, config, export."""

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
from pqjax.models import t5  # noqa: E402
from pqjax.models.configs import ConfigError  # noqa: E402
from pqjax.models.presets_text import FLUX_T5_XXL_CONFIG  # noqa: E402
from tests.parity import assert_close_rel, randomize_  # noqa: E402

VOCAB = 57
CONFIGS = {
    # T5 v1.1 (FLUX): gated gelu_new. Few buckets and a short max_distance so that a 37-token
    # sequence reaches the log-spaced and the saturated buckets.
    "v1_1": dict(feed_forward_proj="gated-gelu", relative_attention_num_buckets=12,
                 relative_attention_max_distance=20),
    # original T5: relu, no gate.
    "original": dict(feed_forward_proj="relu", num_heads=3, d_kv=12),
    "gated_silu": dict(feed_forward_proj="gated-silu", relative_attention_num_buckets=32,
                       relative_attention_max_distance=128),
}


def tiny_t5(seed: int = 0, **overrides):
    """A random transformers T5EncoderModel (float32, eval)."""
    cfg = dict(vocab_size=VOCAB, d_model=40, d_kv=8, d_ff=72, num_layers=3, num_heads=5,
               feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = transformers.T5EncoderModel(transformers.T5Config(**cfg)).eval()
    randomize_(model, std=0.2, seed=seed)
    return model


def run_both(tmodel, jmodel, ids: np.ndarray, mask: np.ndarray | None):
    with torch.no_grad():
        ref = tmodel(torch.as_tensor(ids), None if mask is None else torch.as_tensor(mask))
    out = jmodel(jnp.asarray(ids), None if mask is None else jnp.asarray(mask))
    return np.asarray(out, np.float32), ref.last_hidden_state.float().numpy()


def make_ids(lengths: list[int], seq: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """T5-style right-padded ids (`..., </s>=1, <pad>=0, ...`) and their attention mask."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, VOCAB, (len(lengths), seq))
    mask = (np.arange(seq)[None] < np.array(lengths)[:, None]).astype(np.int64)
    ids = np.where(mask == 1, ids, 0)
    ids[np.arange(len(lengths)), np.array(lengths) - 1] = 1
    return ids, mask


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("padding", [False, True])
def test_float32_parity(name, padding, tmp_path):
    tmodel = tiny_t5(**CONFIGS[name])
    tmodel.save_pretrained(tmp_path)
    jmodel = convert.load_model(tmp_path)
    ids, mask = make_ids([37, 12, 30], seq=37)  # batch > 1, seq not a power of two
    out, ref = run_both(tmodel, jmodel, ids, mask if padding else None)
    assert_close_rel(out, ref, 1e-4, f"{name} padding={padding}")


def test_bfloat16_parity(tmp_path):
    """bf16 weights and activations in both: agreement at bf16 resolution (bound 3e-2).

    Weights at std 0.1: with 0.2, three unscaled-attention layers are chaotic enough in bf16
    that transformers' own bf16 output is 7% off its float32 output.
    """
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=40, d_kv=8, d_ff=72, num_layers=3,
                                num_heads=5, **CONFIGS["v1_1"])
    tmodel = transformers.T5EncoderModel(cfg).eval()
    randomize_(tmodel, std=0.1)
    tmodel.save_pretrained(tmp_path)
    ids, _ = make_ids([21, 9], seq=21)
    ref32 = run_both(tmodel, convert.load_model(tmp_path), ids, None)[1]
    out, ref = run_both(tmodel.to(torch.bfloat16), convert.load_model(tmp_path, dtype=jnp.bfloat16),
                        ids, None)
    assert_close_rel(out, ref, 3e-2, "bf16 vs transformers bf16")
    assert_close_rel(out, ref32, 3e-2, "bf16 vs float32")


def test_relative_position_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = np.arange(-1200, 1200)
    for buckets, distance in [(32, 128), (12, 20), (64, 256), (8, 9)]:
        ref = T5Attention._relative_position_bucket(torch.as_tensor(rel), True, buckets, distance)
        out = t5.relative_position_bucket(rel, buckets, distance)
        np.testing.assert_array_equal(out, ref.numpy(), err_msg=f"{buckets=} {distance=}")


def test_checkpoint_holds_only_shared_embedding(tmp_path):
    """save_pretrained writes `shared.weight` only; the model expects exactly the saved keys."""
    from safetensors import safe_open

    tmodel = tiny_t5()
    tmodel.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "np") as f:
        saved = set(f.keys())
    assert "shared.weight" in saved and "encoder.embed_tokens.weight" not in saved
    assert set(bridge.param_map(convert.load_model(tmp_path))) == saved


@pytest.mark.parametrize("variant", ["both", "embed_tokens_only"])
def test_tied_embedding_variants(variant, tmp_path):
    from safetensors.torch import load_file, save_file

    tmodel = tiny_t5()
    tmodel.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"].clone()
    if variant == "embed_tokens_only":
        del tensors["shared.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    out, ref = run_both(tmodel, convert.load_model(tmp_path), *make_ids([9, 5], seq=9))
    assert_close_rel(out, ref, 1e-4, variant)


def test_export_round_trip(tmp_path):
    tmodel = tiny_t5(**CONFIGS["v1_1"])
    tmodel.save_pretrained(tmp_path / "src")
    jmodel = convert.load_model(tmp_path / "src")
    convert.export_model(jmodel, tmp_path / "out")
    raw = json.loads((tmp_path / "out" / "config.json").read_text())
    assert raw["architectures"] == ["T5EncoderModel"]
    back = transformers.T5EncoderModel.from_pretrained(tmp_path / "out").eval()
    ids, mask = make_ids([15, 7], seq=15)
    with torch.no_grad():
        a = tmodel(torch.as_tensor(ids), torch.as_tensor(mask)).last_hidden_state
        b = back(torch.as_tensor(ids), torch.as_tensor(mask)).last_hidden_state
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert convert.load_model(tmp_path / "out").config == jmodel.config


def test_read_config():
    cfg = t5.read_config(FLUX_T5_XXL_CONFIG, "flux")
    assert (cfg.d_model, cfg.num_layers, cfg.dense_act_fn, cfg.is_gated_act) == (
        4096, 24, "gelu_new", True
    )
    # explicit dense_act_fn / is_gated_act override feed_forward_proj, as in transformers
    for raw in ({"feed_forward_proj": "gated-gelu"}, {"feed_forward_proj": "gelu"},
                {"feed_forward_proj": "gated-gelu", "dense_act_fn": "relu", "is_gated_act": False}):
        ours, theirs = t5.read_config(raw, "cfg.json"), transformers.T5Config.from_dict(raw)
        assert (ours.dense_act_fn, ours.is_gated_act) == (theirs.dense_act_fn, theirs.is_gated_act)
    with pytest.raises(ConfigError, match="unsupported config field 'rotary_dim'"):
        t5.read_config({**FLUX_T5_XXL_CONFIG, "rotary_dim": 64}, "cfg.json")
    with pytest.raises(ConfigError, match="is_decoder"):
        t5.read_config({**FLUX_T5_XXL_CONFIG, "is_decoder": True}, "cfg.json")
    with pytest.raises(ConfigError, match="dense_act_fn"):
        t5.read_config({**FLUX_T5_XXL_CONFIG, "dense_act_fn": "mish"}, "cfg.json")


def test_t5_xxl_param_count():
    """FLUX's T5 v1.1 XXL preset builds abstractly with exactly transformers' parameter count."""
    abstract = nnx.eval_shape(lambda: t5.T5EncoderModel(t5.T5_XXL_FLUX, rngs=nnx.Rngs(0)))
    n = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(nnx.state(abstract)))
    with torch.device("meta"):
        ref = transformers.T5EncoderModel(transformers.T5Config(**FLUX_T5_XXL_CONFIG))
    n_ref = sum(p.numel() for p in ref.parameters())  # shared and embed_tokens counted once
    assert n == n_ref == 4_762_310_656
