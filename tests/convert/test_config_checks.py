"""Issue 15, convert side: configs and weights that load although they are wrong, and pickles.

config.json field types, layer counts against the checkpoint (before the model is built),
float64 weights, legacy torch pickles, and the allow_pickle opt-in at every entry point.
"""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import convert
import convert.loader as loader_mod
from pqjax.models.configs import ConfigError
from tests.convert.test_integrity import WEIGHTS, _model, _same


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = _model(0)
    return model, convert.export_model(model, tmp_path_factory.mktemp("exp") / "transformer")


def _copy_with(folder, tmp_path, **changes):
    dst = tmp_path / "transformer"
    shutil.copytree(folder, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("field, value, want", [
    ("guidance_embeds", "no", r"'guidance_embeds' = 'no' must be true/false"),  # before: True
    ("num_layers", "1", r"'num_layers' = '1' must be an integer"),  # before: raw TypeError
    ("num_layers", 1.5, r"'num_layers' = 1.5 must be an integer"),  # before: raw TypeError
    ("num_attention_heads", None, r"'num_attention_heads' = None must be an integer"),
    ("axes_dims_rope", [2, 2, "4"], r"'axes_dims_rope' = \[2, 2, '4'\] must be a list of int"),
    ("in_channels", True, r"'in_channels' = True must be an integer"),
])
def test_config_field_types_are_checked(exported, tmp_path, field, value, want):
    folder = _copy_with(exported[1], tmp_path, **{field: value})
    with pytest.raises(ConfigError, match=rf"{folder}/config\.json: config field {want}"):
        convert.load_transformer(folder)


@pytest.mark.parametrize("doc", [[1, 2], "FluxTransformer2DModel", 7])
def test_config_that_is_not_an_object_names_the_file(exported, tmp_path, doc):
    folder = _copy_with(exported[1], tmp_path)
    (folder / "config.json").write_text(json.dumps(doc))
    with pytest.raises(convert.CheckpointError, match=rf"{folder}/config\.json: a config must "
                                                      "be a JSON object"):
        convert.load_transformer(folder)  # before: AttributeError: 'list' has no 'get'


@pytest.mark.parametrize("field, value, have", [
    ("num_layers", 100000, "has 1 \\(transformer_blocks.0 .. transformer_blocks.0\\)"),
    ("num_single_layers", 0, "has 1"),
    ("num_layers", -3, "has 1"),
])
def test_layer_count_typo_fails_before_the_model_is_built(exported, tmp_path, monkeypatch,
                                                          field, value, have):
    folder = _copy_with(exported[1], tmp_path, **{field: value})

    def never(*a, **k):
        raise AssertionError("the model was built before the counts were checked")

    monkeypatch.setattr(loader_mod.nnx, "eval_shape", never)
    # before: 100000 took > 12 min of building abstract blocks, then a missing-keys error
    with pytest.raises(ConfigError, match=rf"config\.json: {field} = {value} means .*{have}"):
        convert.load_transformer(folder)


def test_shape_mismatch_is_found_before_any_tensor_is_read(exported, tmp_path, monkeypatch):
    folder = _copy_with(exported[1], tmp_path, joint_attention_dim=13)
    reads = []
    real = convert.Checkpoint.read
    monkeypatch.setattr(convert.Checkpoint, "read", lambda self, k: reads.append(k) or real(
        self, k))
    with pytest.raises(convert.CheckpointError, match=r"key 'context_embedder.weight' has shape "
                                                      r"\[16, 12\], the model expects \[16, 13\]"):
        convert.load_transformer(folder)
    assert reads == []


def test_float64_weights_warn_once_naming_the_file(exported, tmp_path):
    model, src = exported
    folder = _copy_with(src, tmp_path)
    path = folder / f"{WEIGHTS}.safetensors"
    tensors = {k: v.astype(np.float64) for k, v in load_file(path).items()}
    save_file(tensors, path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = convert.load_transformer(folder)  # before: cast without a word
    f64 = [w for w in caught if "float64" in str(w.message)]
    assert len(f64) == 1 and str(path) in str(f64[0].message)
    assert "cast to float32" in str(f64[0].message)
    assert _same(loaded, model)  # float32 -> float64 -> float32 is exact


# ---- pickles -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def _pickled(torch, exported, tmp_path, *, legacy: bool):
    src = exported[1]
    dst = tmp_path / "pickled" / "transformer"
    dst.mkdir(parents=True)
    shutil.copy(src / "config.json", dst / "config.json")
    state = {k: torch.from_numpy(v) for k, v in load_file(src / f"{WEIGHTS}.safetensors").items()}
    torch.save(state, dst / f"{WEIGHTS}.bin", _use_new_zipfile_serialization=not legacy)
    return dst


@pytest.mark.parametrize("legacy", [True, False])
def test_legacy_and_zip_pickles_load_with_weights_only(torch, exported, tmp_path, legacy):
    folder = _pickled(torch, exported, tmp_path, legacy=legacy)
    with pytest.raises(convert.CheckpointError, match=r"pass allow_pickle=True \(CLI: "
                                                      r"--allow-pickle\)"):
        convert.load_transformer(folder)
    # before (legacy): "cannot load with weights_only=True: mmap can only be used with ..."
    assert _same(convert.load_transformer(folder, allow_pickle=True), exported[0])


def test_legacy_pickle_still_refuses_code(torch, tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    (tmp_path / "config.json").write_text("{}")
    torch.save({"w": Payload()}, tmp_path / "evil.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(convert.CheckpointError, match=r"evil\.bin: cannot load as a legacy "
                                                      r"\(non-zip\) torch checkpoint with "
                                                      r"weights_only=True"):
        loader_mod.open_weights(tmp_path, WEIGHTS, allow_pickle=True)


class _Reached(Exception):
    pass


def test_every_entry_point_takes_allow_pickle(monkeypatch, tmp_path):
    """load_pipeline, convert_and_quantize, stream_quantize and the CLI pass the opt-in on."""
    import convert.loader
    import pqjax.api
    import pqjax.cli
    import pqjax.engine
    import pqjax.pipelines.load as load_mod
    from convert.resolve import embedded_root

    seen = []

    def record(*a, allow_pickle=False, **k):
        seen.append(allow_pickle)
        raise _Reached

    monkeypatch.setattr(load_mod, "_LOADERS", {"TinyFluxDigitsPipeline": record})
    for call in (lambda: load_mod.load_pipeline(allow_pickle=True),
                 lambda: pqjax.api.convert_and_quantize(allow_pickle=True),
                 lambda: pqjax.cli.main(["quantize", "--out", str(tmp_path / "q"),
                                         "--allow-pickle"])):
        with pytest.raises(_Reached):
            call()
    monkeypatch.setattr(convert.loader, "open_weights", record)
    with pytest.raises(_Reached):
        pqjax.engine.stream_quantize(embedded_root(load_mod.EMBEDDED), [], pqjax.QuantConfig(),
                                     tmp_path / "work", allow_pickle=True)
    assert seen == [True, True, True, True]
