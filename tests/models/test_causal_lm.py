"""Parity of the NNX Gemma-2 and Qwen3 text models with transformers' Gemma2Model / Qwen3Model.

Tiny random float32 models saved with `save_pretrained` and loaded by `convert.load_model`.
Bound: max |ours - transformers| <= 1e-4 of the output scale. Both sides compute the same
float32 sums in different orders (XLA vs ATen, grouped vs repeated heads): a few ulp per op,
amplified by at most a few layers of norms and softmaxes, stays far below 1e-4; a wrong mask,
RoPE layout, norm offset or soft-cap moves the output by O(1) of its scale.
"""

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
from pqjax.models import gemma2, qwen3  # noqa: E402
from pqjax.models.configs import ConfigError  # noqa: E402
from tests.parity import assert_close_rel, randomize_  # noqa: E402

VOCAB = 61
BASE = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
            pad_token_id=0)
GEMMA = {
    # GQA 4 query heads on 2 kv heads; a window of 5 so the 13/17-token rows reach past it;
    # soft-cap small enough that tanh bends (logits reach ~scale of the cap).
    "gqa_window": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       sliding_window=5, attn_logit_softcapping=2.0, query_pre_attn_scalar=16),
    # MHA (3 heads, 3 kv heads), head_dim 10 (not a power of two), no soft-cap, global only.
    "mha_global": dict(num_attention_heads=3, num_key_value_heads=3, head_dim=10,
                       attn_logit_softcapping=None, query_pre_attn_scalar=7,
                       layer_types=["full_attention"] * 3, rope_parameters=dict(
                           rope_type="default", rope_theta=500.0)),
}
QWEN = {
    "gqa": dict(num_attention_heads=6, num_key_value_heads=2, head_dim=8),
    "mha_theta": dict(num_attention_heads=2, num_key_value_heads=2, head_dim=12,
                      rope_parameters=dict(rope_type="default", rope_theta=123.0),
                      attention_bias=True),
}


def tiny(kind: str, name: str, seed: int = 0):
    cls, cfg_cls, extra = {
        "gemma2": (transformers.Gemma2Model, transformers.Gemma2Config, GEMMA),
        "qwen3": (transformers.Qwen3Model, transformers.Qwen3Config, QWEN),
    }[kind]
    torch.manual_seed(seed)
    model = cls(cfg_cls(**BASE, **extra[name])).eval()
    randomize_(model, std=0.2, seed=seed)
    return model


def right_padded(lengths: list[int], seq: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Ids with pad id 0 after each row's length, as both pipelines tokenize."""
    rng = np.random.default_rng(seed)
    mask = (np.arange(seq)[None] < np.array(lengths)[:, None]).astype(np.int64)
    return np.where(mask == 1, rng.integers(1, VOCAB, (len(lengths), seq)), 0), mask


def reference(tmodel, ids, mask, layer=None):
    with torch.no_grad():
        out = tmodel(torch.as_tensor(ids), attention_mask=None if mask is None else
                     torch.as_tensor(mask), output_hidden_states=layer is not None)
    h = out.last_hidden_state if layer is None else out.hidden_states[layer]
    return h.float().numpy()


CASES = [("gemma2", n) for n in sorted(GEMMA)] + [("qwen3", n) for n in sorted(QWEN)]


@pytest.mark.parametrize("kind,name", CASES)
def test_float32_parity(kind, name, tmp_path):
    tmodel = tiny(kind, name)
    tmodel.save_pretrained(tmp_path)
    jmodel = convert.load_model(tmp_path)
    assert isinstance(jmodel, {"gemma2": gemma2.Gemma2Model, "qwen3": qwen3.Qwen3Model}[kind])
    ids, mask = right_padded([17, 13, 4], seq=17)  # odd length, padding, a short row
    for m in (mask, None):
        out = np.asarray(jmodel(jnp.asarray(ids), None if m is None else jnp.asarray(m)))
        ref = reference(tmodel, ids, m)
        real = (mask if m is not None else np.ones_like(mask)).astype(bool)
        # Padded positions are never read downstream (the pipelines pass the mask on);
        # transformers' fused attention may treat them differently, so compare real tokens.
        assert_close_rel(out[real], ref[real], 1e-4, f"{kind}/{name} mask={m is not None}")


@pytest.mark.parametrize("name", sorted(QWEN))
def test_qwen3_hidden_states(name, tmp_path):
    """Every `hidden_states[i]`, Z-Image's [-2] among them, from the layers it needs only."""
    tmodel = tiny("qwen3", name, seed=1)
    tmodel.save_pretrained(tmp_path)
    jmodel = convert.load_model(tmp_path)
    ids, mask = right_padded([9, 6], seq=9, seed=1)
    n = jmodel.config.num_hidden_layers
    for layer in range(n + 1):
        out = np.asarray(jmodel.hidden_state(jnp.asarray(ids), jnp.asarray(mask), layer=layer))
        ref = reference(tmodel, ids, mask, layer=layer)
        real = mask.astype(bool)
        assert_close_rel(out[real], ref[real], 1e-4, f"hidden_states[{layer}]")
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, 3\]"):
        jmodel.hidden_state(jnp.asarray(ids), layer=n + 1)


def test_gemma2_sliding_window_and_softcap_matter(tmp_path):
    """The window and the soft-cap each change the output here, so parity above tests them."""
    tmodel = tiny("gemma2", "gqa_window")
    tmodel.save_pretrained(tmp_path)
    jmodel = convert.load_model(tmp_path)
    ids, mask = right_padded([17], seq=17)
    base = np.asarray(jmodel(jnp.asarray(ids), jnp.asarray(mask)))
    for change in (dict(sliding_window=64), dict(attn_logit_softcapping=None)):
        cfg = json.loads((tmp_path / "config.json").read_text())
        cfg.update(change)
        other = tmp_path / "other"
        other.mkdir(exist_ok=True)
        (other / "config.json").write_text(json.dumps(cfg))
        (other / "model.safetensors").write_bytes((tmp_path / "model.safetensors").read_bytes())
        alt = np.asarray(convert.load_model(other)(jnp.asarray(ids), jnp.asarray(mask)))
        assert np.abs(alt - base).max() > 1e-2 * np.abs(base).max(), change


def test_bfloat16_close_to_transformers_bfloat16(tmp_path):
    """bf16 weights in both: agreement at bf16 resolution (3e-2 of the output scale: ~8 bf16
    roundings of 2**-8 each through three layers)."""
    tmodel = tiny("gemma2", "gqa_window")
    tmodel.save_pretrained(tmp_path)
    ids, mask = right_padded([11, 7], seq=11)
    out = np.asarray(convert.load_model(tmp_path, dtype=jnp.bfloat16)(
        jnp.asarray(ids), jnp.asarray(mask)), np.float32)
    ref = reference(tmodel.to(torch.bfloat16), ids, mask)
    real = mask.astype(bool)
    assert_close_rel(out[real], ref[real], 3e-2, "bf16")


@pytest.mark.parametrize("kind", ["gemma2", "qwen3"])
def test_export_round_trip(kind, tmp_path):
    name = sorted(GEMMA if kind == "gemma2" else QWEN)[0]
    tmodel = tiny(kind, name)
    tmodel.save_pretrained(tmp_path / "src")
    jmodel = convert.load_model(tmp_path / "src")
    convert.export_model(jmodel, tmp_path / "out")
    back = type(tmodel).from_pretrained(tmp_path / "out").eval()
    ids, mask = right_padded([8, 5], seq=8)
    np.testing.assert_array_equal(reference(back, ids, mask), reference(tmodel, ids, mask))
    assert convert.load_model(tmp_path / "out").config == jmodel.config


def test_causal_lm_checkpoint_keys(tmp_path):
    """Weights saved from Qwen3ForCausalLM (`model.` prefix, `lm_head`) load as the encoder."""
    cfg = transformers.Qwen3Config(**BASE, **QWEN["gqa"], tie_word_embeddings=False)
    torch.manual_seed(0)
    lm = transformers.Qwen3ForCausalLM(cfg).eval()
    randomize_(lm, std=0.2)
    lm.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "architectures": ["Qwen3Model"]}))
    ids, mask = right_padded([7, 3], seq=7)
    out = np.asarray(convert.load_model(tmp_path)(jnp.asarray(ids), jnp.asarray(mask)))
    ref = reference(lm.model, ids, mask)
    real = mask.astype(bool)
    assert_close_rel(out[real], ref[real], 1e-4, "from Qwen3ForCausalLM")


def test_read_config_errors():
    with pytest.raises(ConfigError, match="cfg.json: config field 'num_hidden_layers' = '2' "
                       "must be an integer"):
        gemma2.read_config({"num_hidden_layers": "2"}, "cfg.json")
    with pytest.raises(ConfigError, match="num_hidden_layers must be a positive integer"):
        gemma2.read_config({"num_hidden_layers": 0}, "cfg.json")
    with pytest.raises(ConfigError, match="num_attention_heads 6 is not a multiple"):
        qwen3.read_config({"num_attention_heads": 6, "num_key_value_heads": 4}, "cfg.json")
    with pytest.raises(ConfigError, match="rope_type 'yarn' is not supported"):
        qwen3.read_config({"rope_parameters": {"rope_type": "yarn", "factor": 4}}, "cfg.json")
    with pytest.raises(ConfigError, match="unsupported config field 'rotary_dim'"):
        gemma2.read_config({"rotary_dim": 8}, "cfg.json")
    with pytest.raises(ConfigError, match="a config must be a JSON object"):
        qwen3.read_config([1, 2], "cfg.json")
    # transformers 4.x spelling of the RoPE base
    assert qwen3.read_config({"rope_theta": 5000}, "cfg.json").rope_theta == 5000.0


@pytest.mark.parametrize("kind", ["gemma2", "qwen3"])
def test_full_size_parameter_count(kind):
    """The presets build abstractly with transformers' own parameter count."""
    ours_cfg, cls, cfg_cls = {
        "gemma2": (gemma2.GEMMA2_2B, gemma2.Gemma2Model, transformers.Gemma2Config),
        "qwen3": (qwen3.QWEN3_4B, qwen3.Qwen3Model, transformers.Qwen3Config),
    }[kind]
    abstract = nnx.eval_shape(lambda: cls(ours_cfg, rngs=nnx.Rngs(0)))
    n = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(nnx.state(abstract)))
    raw = {"gemma2": gemma2.write_config, "qwen3": qwen3.write_config}[kind](ours_cfg)
    with torch.device("meta"):
        ref = getattr(transformers, raw["architectures"][0])(cfg_cls(**raw))
    assert n == sum(p.numel() for p in ref.parameters())
