"""Block-wise streaming quantization: interrupted + resumed equals uninterrupted."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

import convert  # noqa: E402
import pqjax  # noqa: E402
from pqjax import permute  # noqa: E402
from pqjax.streaming import StreamInterrupted, stream_quantize  # noqa: E402
from tests.models.test_flux import make_inputs, torch_flux  # noqa: E402
from tests.parity import to_jax  # noqa: E402

CFG = dict(num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=2,
           joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
           axes_dims_rope=(8, 12, 12), in_channels=8)


def bits(v) -> np.ndarray:
    a = np.asarray(v.get_value())
    return a.view(np.uint8) if a.dtype.itemsize == 1 else a


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharded")
    torch_flux(CFG, seed=1).save_pretrained(folder, max_shard_size="100KB")
    assert len(list(folder.glob("*.safetensors"))) > 3
    batches = [{k: to_jax(v) for k, v in make_inputs(CFG, 2, 4, 4, 6, seed=s).items()}
               for s in range(2)]
    return folder, batches


KW = dict(dtype=jnp.float32, n_rows=48)


@pytest.fixture(scope="module")
def streamed(sharded, tmp_path_factory):
    """(whole model, its report, folder): folder/a an uninterrupted run, folder/b one stopped
    after its first block. Built once: both tests read them."""
    folder, batches = sharded
    out = tmp_path_factory.mktemp("streamed")
    whole, report = stream_quantize(folder, batches, pqjax.QuantConfig(progress=False),
                                    out / "a", **KW)
    with pytest.raises(StreamInterrupted, match="after 1 blocks"):
        stream_quantize(folder, batches, pqjax.QuantConfig(progress=False), out / "b",
                        stop_after=1, **KW)
    return whole, report, out


def test_resume_after_interruption_equals_uninterrupted(sharded, streamed):
    folder, batches = sharded
    whole, report, out = streamed
    manifest = json.loads((out / "b" / "manifest.json").read_text())
    assert list(manifest["blocks"]) == ["transformer_blocks.0"]
    resumed, _ = stream_quantize(folder, batches, pqjax.QuantConfig(progress=False), out / "b",
                                 **KW)
    a = dict(nnx.to_flat_state(nnx.state(whole)))
    b = dict(nnx.to_flat_state(nnx.state(resumed)))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(bits(a[key]), bits(b[key]), err_msg=str(key))
    assert isinstance(whole.transformer_blocks[0].attn.to_q, pqjax.QuantLinear)
    assert all(r["err"] <= r["err_rtn"] for r in report.layers)
    # site names are the model's own (absolute, as permute.sites(model) names them)
    names = {s.name for s in permute.sites(convert.load_transformer(folder))}
    assert report.sites and {r["site"] for r in report.sites} <= names
    assert set(report.perms) <= names
    # every quantized layer is in the report, site or not (AdaLN linears read temb, no site)
    quantized = {p for p, m in nnx.iter_graph(whole) if isinstance(m, pqjax.QuantLinear)}
    assert {r["layer"] for r in report.layers} == {".".join(map(str, p)) for p in quantized}
    out = np.asarray(whole(**batches[0]))
    assert out.shape == (2, 16, 8) and np.isfinite(out).all()


def test_resume_refuses_a_different_config(sharded, streamed):
    """A folder holding a run (here the finished one) is refused for another config, and is
    left as it was."""
    folder, batches = sharded
    work = streamed[2] / "a"
    before = (work / "manifest.json").read_text()
    with pytest.raises(ValueError, match="another source/config"):
        stream_quantize(folder, batches, pqjax.QuantConfig(method="rtn", progress=False),
                        work, **KW)
    assert (work / "manifest.json").read_text() == before


def test_embedded_model_resumed_after_one_block_equals_uninterrupted(tmp_path):
    """The shipped trained model (2 double + 2 single blocks), on its own sampling
    trajectories: a PermuQuant run stopped after its first block and resumed, with progress
    bars on this time (a runtime switch, not part of the work), is bit for bit the run that was
    never stopped."""
    from pqjax.pipelines.load import EMBEDDED, load_pipeline

    pipe = load_pipeline(EMBEDDED)
    batches = pipe.calibration_batches(["a handwritten digit 3", "a handwritten digit 8"],
                                       num_steps=2)
    quiet, loud = pqjax.QuantConfig(progress=False), pqjax.QuantConfig(progress=True)
    whole, report = stream_quantize(EMBEDDED, batches, quiet, tmp_path / "a", **KW)
    with pytest.raises(StreamInterrupted, match="after 1 blocks"):
        stream_quantize(EMBEDDED, batches, quiet, tmp_path / "b", stop_after=1, **KW)
    resumed, _ = stream_quantize(EMBEDDED, batches, loud, tmp_path / "b", **KW)
    a = dict(nnx.to_flat_state(nnx.state(whole)))
    b = dict(nnx.to_flat_state(nnx.state(resumed)))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(bits(a[key]), bits(b[key]), err_msg=str(key))
    assert report.summary["n_layers"] == len(report.layers) > 0
    assert all(r["err"] <= r["err_rtn"] for r in report.layers)
