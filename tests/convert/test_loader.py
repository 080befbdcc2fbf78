"""Model loading: name resolution, checkpoint validation, pickles, export round trip."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import convert  # noqa: E402
from convert.loader import open_weights  # noqa: E402
from pqjax.models.configs import ConfigError  # noqa: E402
from tests.models.test_flux import make_inputs, run_both, torch_flux  # noqa: E402
from tests.parity import assert_close_rel  # noqa: E402

CFG = dict(
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=12,
    pooled_projection_dim=6,
    guidance_embeds=True,
    axes_dims_rope=(2, 2, 4),
    in_channels=4,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random FLUX transformer saved by diffusers: (torch model, folder)."""
    folder = tmp_path_factory.mktemp("tiny") / "transformer"
    model = torch_flux(CFG)
    model.save_pretrained(folder)
    return model, folder


def test_pipeline_root_and_component_folder(tiny, tmp_path):
    _, folder = tiny
    root = tmp_path / "pipe"
    shutil.copytree(folder, root / "transformer")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    assert convert.resolve(root) == root / "transformer"
    assert convert.resolve(folder) == folder
    assert convert.resolve(str(root / "transformer")) == root / "transformer"


@pytest.mark.parametrize("env", ["HF_HUB_CACHE", "HF_HOME"])
def test_hugging_face_cache_layout(tiny, tmp_path, monkeypatch, env):
    _, folder = tiny
    cache = tmp_path / "hub"
    repo = cache / "models--black-forest-labs--FLUX.1-dev"
    snap = repo / "snapshots" / "0123abcd"
    shutil.copytree(folder, snap / "transformer")
    (snap / "model_index.json").write_text("{}")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    for var in ("HF_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(env, str(cache if env == "HF_HUB_CACHE" else tmp_path))
    assert convert.resolve("flux-dev") == snap / "transformer"
    assert convert.resolve("black-forest-labs/FLUX.1-dev") == snap / "transformer"
    model = convert.load_transformer("flux-dev")
    assert model.config.guidance_embeds


def test_absent_model_names_paths_and_download_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(convert.ModelNotFoundError) as e:
        convert.resolve("flux-schnell")
    msg = str(e.value)
    assert "empty-cache" in msg and "FLUX.1-schnell" in msg and "download" in msg
    assert "never downloads" in msg


def test_embedded_name_resolves_like_load_pipeline(tmp_path, monkeypatch):
    import pqjax
    from pqjax.pipelines.load import resolve_root

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.chdir(tmp_path)  # no folder of that name here: the package's asset is used
    folder = convert.resolve(pqjax.EMBEDDED)
    assert folder.name == "transformer" and folder.parent == resolve_root(pqjax.EMBEDDED)
    assert (folder.parent / "model_index.json").is_file()
    model = convert.load_transformer(pqjax.EMBEDDED)
    assert model.config == convert.load_transformer(folder).config
    with pytest.raises(convert.ModelNotFoundError, match=pqjax.EMBEDDED):  # listed when absent
        convert.resolve("no-such-model")


def test_folder_without_model(tmp_path):
    with pytest.raises(convert.ModelNotFoundError, match=r"model_index\.json"):
        convert.resolve(tmp_path)


def _copy(folder, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    return dst


def _rewrite(path, drop=(), add=None, reshape=None):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(path)
    for k in drop:
        del tensors[k]
    tensors.update(add or {})
    for k, shape in (reshape or {}).items():
        tensors[k] = np.zeros(shape, tensors[k].dtype)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_and_unexpected_keys_are_listed(tiny, tmp_path):
    folder = _copy(tiny[1], tmp_path)
    weights = folder / "diffusion_pytorch_model.safetensors"
    _rewrite(weights, drop=["proj_out.bias"], add={"extra.weight": np.ones(2, np.float32)})
    with pytest.raises(convert.CheckpointError) as e:
        convert.load_model(folder)
    msg = str(e.value)
    assert "1 missing keys: proj_out.bias" in msg
    assert "extra.weight (in" in msg and "diffusion_pytorch_model.safetensors" in msg


def test_shape_mismatch_names_file_and_key(tiny, tmp_path):
    folder = _copy(tiny[1], tmp_path)
    weights = folder / "diffusion_pytorch_model.safetensors"
    _rewrite(weights, reshape={"x_embedder.weight": (16, 5)})
    with pytest.raises(
        convert.CheckpointError,
        match=r"diffusion_pytorch_model\.safetensors: key "
        r"'x_embedder\.weight' has shape \[16, 5\], the model expects \[16, 4\]",
    ):
        convert.load_model(folder)


def test_unsupported_config_field(tiny, tmp_path):
    folder = _copy(tiny[1], tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["use_magic"] = True
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json: unsupported config field 'use_magic'"):
        convert.load_model(folder)


def test_unknown_model_class(tiny, tmp_path):
    folder = _copy(tiny[1], tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["_class_name"] = "MysteryTransformer"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="'MysteryTransformer' is not supported"):
        convert.load_model(folder)


def test_pickles_are_refused_unless_opted_in(tiny, tmp_path):
    tmodel, folder = tiny
    dst = tmp_path / "pickled"
    dst.mkdir()
    shutil.copy(folder / "config.json", dst / "config.json")
    torch.save(tmodel.state_dict(), dst / "diffusion_pytorch_model.bin")
    with pytest.raises(convert.CheckpointError, match="allow_pickle=True"):
        convert.load_model(dst)
    jmodel = convert.load_model(dst, allow_pickle=True)
    out, ref = run_both(tmodel, jmodel, make_inputs(CFG, batch=2, h=2, w=3, n_txt=3))
    assert_close_rel(out, ref, 1e-4, "pickled checkpoint")


def test_pickle_loading_uses_weights_only(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    torch.save({"w": Payload()}, tmp_path / "evil.bin")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(convert.CheckpointError, match="weights_only=True"):
        open_weights(tmp_path, "diffusion_pytorch_model", allow_pickle=True)


@pytest.mark.parametrize("max_shard_bytes", [None, 20_000])
def test_round_trip_through_diffusers(tiny, tmp_path, max_shard_bytes):
    tmodel, folder = tiny
    jmodel = convert.load_transformer(folder)
    out_dir = convert.export_transformer(
        jmodel, tmp_path / "export", max_shard_bytes=max_shard_bytes
    )
    if max_shard_bytes:
        assert len(list(out_dir.glob("*.safetensors"))) > 1
        assert (out_dir / "diffusion_pytorch_model.safetensors.index.json").is_file()
    reloaded = diffusers.FluxTransformer2DModel.from_pretrained(out_dir).eval()
    for (k, a), (k2, b) in zip(
        sorted(tmodel.state_dict().items()), sorted(reloaded.state_dict().items())
    ):
        assert k == k2
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    inputs = make_inputs(CFG, batch=2, h=3, w=2, n_txt=5)
    with torch.no_grad():
        np.testing.assert_array_equal(
            reloaded(**inputs).sample.numpy(), tmodel(**inputs).sample.numpy()
        )
    # and our own loader reads the export (sharded or not) back to the same function
    again = convert.load_transformer(out_dir)
    out1, _ = run_both(tmodel, jmodel, inputs)
    out2, _ = run_both(tmodel, again, inputs)
    np.testing.assert_array_equal(out1, out2)
