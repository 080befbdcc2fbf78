"""Issue 15, convert side: writes that cannot lose or mix data, paths that cannot leave the model
folder, HF cache entries that cannot silently stand in for another, and one error hierarchy.

Each test asserts the message, that the earlier data is intact (or the new data complete), and
that nothing half-written is left behind. No torch needed: tiny NNX FLUX models.
"""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import convert
import convert.export as export_mod
from convert.safetensors_io import Checkpoint, CheckpointError, TensorSpec, write_safetensors
from pqjax.errors import CheckpointError as BaseCheckpointError
from pqjax.errors import MissingFileError
from pqjax.models.configs import ConfigError
from pqjax.models.flux import FluxConfig, FluxTransformer2DModel

CFG = FluxConfig(num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
                 joint_attention_dim=12, pooled_projection_dim=6, guidance_embeds=True,
                 axes_dims_rope=(2, 2, 4), in_channels=4)
WEIGHTS = "diffusion_pytorch_model"


def _model(seed: int) -> FluxTransformer2DModel:
    """Random weights from numpy (an eager NNX init compiles each initializer: ~30 s)."""
    model = nnx.eval_shape(lambda: FluxTransformer2DModel(CFG, dtype=np.float32,
                                                          rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape = var.get_value().shape
        var.set_value(jax.device_put(rng.standard_normal(shape).astype(np.float32)))
    return model


@pytest.fixture(scope="module")
def models():
    return _model(0), _model(1)


def _params(model) -> dict[str, np.ndarray]:
    return {"/".join(map(str, k)): np.asarray(v.get_value())
            for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _same(a, b) -> bool:
    pa, pb = _params(a), _params(b)
    return pa.keys() == pb.keys() and all(np.array_equal(pa[k], pb[k]) for k in pa)


def _names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _leftovers(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".export-" in p.name or p.suffix == ".tmp")


# ---- write_safetensors ----

def test_failed_write_leaves_no_tmp_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "w.safetensors"
    old = {"x": np.arange(4, dtype=np.float32)}
    save_file(old, path)
    specs = [TensorSpec("x", (4,), np.dtype(np.float32)), TensorSpec("y", (2,), np.dtype(np.int8))]

    def get(key):
        if key == "y":
            raise RuntimeError("disk full")
        return np.ones(4, np.float32)

    with pytest.raises(RuntimeError, match="disk full"):
        write_safetensors(path, specs, get)
    assert _names(tmp_path) == ["w.safetensors"]  # before: w.safetensors.tmp was left behind
    np.testing.assert_array_equal(load_file(path)["x"], old["x"])


def test_zero_dim_tensors_are_written(tmp_path):
    arrays = {"scale": np.array(2.5, np.float32), "v": np.arange(3, dtype=np.int64)}
    specs = [TensorSpec(k, v.shape, v.dtype) for k, v in arrays.items()]
    write_safetensors(tmp_path / "s.safetensors", specs, arrays.__getitem__)
    back = load_file(tmp_path / "s.safetensors")  # the reference reader
    assert back["scale"].shape == () and back["scale"] == np.float32(2.5)
    np.testing.assert_array_equal(back["v"], arrays["v"])


# ---- export: a whole folder, swapped in ----

def test_single_file_export_over_a_sharded_one_replaces_it(models, tmp_path):
    old, new = models
    out = tmp_path / "transformer"
    convert.export_model(old, out, max_shard_bytes=4000)
    assert (out / f"{WEIGHTS}.safetensors.index.json").is_file()
    convert.export_model(new, out)
    # before: the old index and shards stayed, and both pqjax and diffusers loaded the OLD model
    assert _names(out) == ["config.json", f"{WEIGHTS}.safetensors"]
    assert _same(convert.load_transformer(out), new)
    assert _leftovers(tmp_path) == []


def test_killed_sharded_export_leaves_the_old_export_whole(models, tmp_path, monkeypatch):
    old, new = models
    out = tmp_path / "transformer"
    convert.export_model(old, out, max_shard_bytes=4000)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []
    real = export_mod.write_safetensors

    def dies_on_third_shard(path, *a, **k):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process is stopped mid-export
        return real(path, *a, **k)

    monkeypatch.setattr(export_mod, "write_safetensors", dies_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        convert.export_model(new, out, max_shard_bytes=4000)
    # before: shards 1-2 of the new export sat next to shards 3.. of the old one and loaded
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _same(convert.load_transformer(out), old)
    assert _leftovers(tmp_path) == []


def test_temporaries_of_a_killed_process_are_removed(models, tmp_path):
    out = tmp_path / "transformer"
    dead = tmp_path / f".transformer{export_mod.TMP_TAG}999999999-dead"  # no such pid
    dead.mkdir()
    (dead / "config.json").write_text("{}")
    convert.export_model(models[0], out)
    assert _leftovers(tmp_path) == []


def test_old_export_moved_aside_by_a_killed_swap_is_named_not_deleted(models, tmp_path):
    aside = tmp_path / f".transformer{export_mod.OLD_TAG}999999999-dead"
    convert.export_model(models[0], aside)
    with pytest.raises(CheckpointError, match=r"export-old-999999999-dead.*rename it back"):
        convert.export_model(models[1], tmp_path / "transformer")
    assert _same(convert.load_transformer(aside), models[0])


@pytest.mark.parametrize("foreign", ["notes.txt", "subdir"])
def test_export_refuses_to_replace_a_folder_that_is_not_a_model(models, tmp_path, foreign):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / foreign).mkdir() if foreign == "subdir" else (out / foreign).write_text("keep me")
    with pytest.raises(CheckpointError, match=rf"mine: not a model folder \(it holds {foreign}\)"):
        convert.export_model(models[0], out)
    assert _names(out) == sorted(["config.json", foreign])
    assert _leftovers(tmp_path) == []


# ---- paths and index files ----

@pytest.fixture(scope="module")
def sharded(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded") / "transformer"
    return convert.export_model(models[0], out, max_shard_bytes=4000)


def _with_index(sharded, tmp_path, edit):
    folder = tmp_path / "model" / "transformer"
    shutil.copytree(sharded, folder)
    index = folder / f"{WEIGHTS}.safetensors.index.json"
    doc = json.loads(index.read_text())
    edit(doc)
    index.write_text(json.dumps(doc))
    return folder, index


@pytest.mark.parametrize("name", ["../../outside.safetensors", "sub/../../outside.safetensors",
                                  "{tmp}/outside.safetensors"])
def test_shard_outside_the_model_folder_is_refused(sharded, tmp_path, name):
    name = name.format(tmp=tmp_path)
    first = f"{WEIGHTS}-00001-of-"

    def edit(doc):  # the keys of shard 1 now point at a copy of it outside the folder
        for key, shard in doc["weight_map"].items():
            if shard.startswith(first):
                doc["weight_map"][key] = name

    folder, index = _with_index(sharded, tmp_path, edit)
    outside = (folder / name).resolve()
    assert not outside.is_relative_to(folder)
    shutil.copy(next(folder.glob(first + "*")), outside)  # before: loaded from there
    with pytest.raises(CheckpointError, match=r"index\.json: shard name .* leaves the model"):
        Checkpoint.open(index)


def test_weight_map_that_is_a_list_names_the_index(sharded, tmp_path):
    folder, _ = _with_index(sharded, tmp_path, lambda d: d.update(weight_map=[]))
    with pytest.raises(CheckpointError, match=r"index\.json: not a valid safetensors index: "
                                              r"\"weight_map\" must map.*got list"):
        convert.load_transformer(folder)  # before: bare AttributeError


# ---- the Hugging Face cache ----

@pytest.fixture
def hub(models, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    repo = cache / "models--black-forest-labs--FLUX.1-dev"
    snap = repo / "snapshots" / "aaaa"
    convert.export_model(models[0], snap / "transformer")
    (snap / "model_index.json").write_text("{}")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HOME", raising=False)
    return repo, snap


def test_refs_main_naming_a_missing_revision_is_refused(hub):
    repo, _ = hub
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("bbbb\n")
    # before: silently fell back to the newest snapshot, aaaa
    with pytest.raises(convert.ModelNotFoundError, match=r"refs/main names revision 'bbbb'"):
        convert.resolve("flux-dev")


def test_stray_file_in_snapshots_is_not_a_snapshot(hub):
    repo, snap = hub
    stray = repo / "snapshots" / "notes.txt"
    stray.write_text("newest entry, but a file")  # newest mtime: before, it was picked
    assert convert.resolve("flux-dev") == snap / "transformer"


@pytest.mark.parametrize("name", ["", "  "])
def test_empty_model_name_is_refused(tmp_path, monkeypatch, models, name):
    convert.export_model(models[0], tmp_path / "transformer")
    monkeypatch.chdir(tmp_path / "transformer")  # before: "" loaded the current folder
    with pytest.raises(convert.ModelNotFoundError, match="model name or path is empty"):
        convert.load_transformer(name)


# ---- messages and the error hierarchy ----

def test_missing_text_encoder_file_is_named(tmp_path):
    from convert.resolve import embedded_root
    from pqjax.models.text_table import PromptTable

    folder = tmp_path / "text_encoder"
    shutil.copytree(embedded_root("tiny-flux-digits") / "text_encoder", folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(MissingFileError, match=rf"{folder}/model\.safetensors: missing"):
        PromptTable.load(folder)  # before: "not a PromptTable folder (None missing)"


def test_one_checkpoint_error_hierarchy():
    assert convert.CheckpointError is BaseCheckpointError
    assert issubclass(ConfigError, BaseCheckpointError)
    assert issubclass(convert.ModelNotFoundError, BaseCheckpointError)
    assert issubclass(convert.ModelNotFoundError, FileNotFoundError)
    assert issubclass(BaseCheckpointError, ValueError)
    assert issubclass(MissingFileError, BaseCheckpointError)
    assert issubclass(MissingFileError, FileNotFoundError)
