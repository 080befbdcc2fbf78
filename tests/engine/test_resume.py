"""Streamed quantization resumes where it stopped, and only the same work: a work folder of
another run, other calibration inputs, changed weights or damaged files is refused with what
changed, never used."""

from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import convert
import pqjax
from pqjax.engine import StreamInterrupted, stream_quantize
from pqjax.errors import CheckpointError
from pqjax.models.flux import FluxConfig, FluxTransformer2DModel
from tests.engine.test_paths_agree import arrays
from tests.engine.tiny import FLUX, flux_batch
from tests.parity import random_nnx

KW = dict(dtype=jnp.float32, n_rows=32, progress=False)
CONFIG = pqjax.QuantConfig()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny FLUX exported as sharded safetensors, and two calibration batches."""
    path = tmp_path_factory.mktemp("flux")
    model = random_nnx(FluxTransformer2DModel, FluxConfig(**FLUX), 0.2, channel_gains=True)
    convert.export_model(model, path, max_shard_bytes=64 << 10)
    return path, [flux_batch(0), flux_batch(1)]


@pytest.fixture(scope="module")
def finished(folder, tmp_path_factory):
    """(quantized model, work folder) of one uninterrupted run."""
    path, batches = folder
    work = tmp_path_factory.mktemp("finished") / "w"
    qmodel, _ = stream_quantize(path, batches, CONFIG, work, **KW)
    return qmodel, work


def copy_work(work, tmp_path):
    out = tmp_path / "w"
    shutil.copytree(work, out)
    return out


def test_embedded_model_resumed_after_one_block_equals_uninterrupted(tmp_path):
    """The shipped trained model (2 double + 2 single blocks) on its own sampling
    trajectories: a PermuQuant run stopped after its first block and resumed, with progress
    bars on this time (a runtime switch, not part of the work), is bit for bit the run that
    was never stopped."""
    from pqjax.pipelines.load import EMBEDDED, load_pipeline

    pipe = load_pipeline(EMBEDDED)
    batches = pipe.calibration_batches(["a handwritten digit 3", "a handwritten digit 8"],
                                       num_steps=2)
    whole, report = stream_quantize(EMBEDDED, batches, CONFIG, tmp_path / "a", **KW)
    with pytest.raises(StreamInterrupted, match="after 1 blocks"):
        stream_quantize(EMBEDDED, batches, CONFIG, tmp_path / "b", stop_after=1, **KW)
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert list(manifest["stages"]) == ["transformer_blocks.0"]
    resumed, _ = stream_quantize(EMBEDDED, batches, CONFIG, tmp_path / "b",
                                 **{**KW, "progress": True})
    a, b = arrays(whole), arrays(resumed)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert report.summary["n_layers"] == len(report.layers) > 0
    assert all(r["err"] <= r["err_rtn"] for r in report.layers)


def test_resume_without_saved_inputs_runs_the_finished_blocks_again(folder, finished,
                                                                    tmp_path):
    """With the saved block inputs gone, a resumed run recomputes them from the weights
    (checking each block against the hash recorded when it was first read): same model."""
    path, batches = folder
    work = tmp_path / "w"
    with pytest.raises(StreamInterrupted):
        stream_quantize(path, batches, CONFIG, work, stop_after=1, **KW)
    for f in (work / "carries").iterdir():
        f.unlink()
    manifest = json.loads((work / "manifest.json").read_text())
    for entry in manifest["stages"].values():
        entry["files"].pop("carries", None)
    (work / "manifest.json").write_text(json.dumps(manifest))
    resumed, _ = stream_quantize(path, batches, CONFIG, work, **KW)
    a, b = arrays(finished[0]), arrays(resumed)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_another_config_is_refused_and_the_folder_kept(folder, finished, tmp_path):
    path, batches = folder
    work = copy_work(finished[1], tmp_path)
    before = (work / "manifest.json").read_text()
    with pytest.raises(CheckpointError, match=r"config.method: \"permuquant\" -> \"rtn\""):
        stream_quantize(path, batches, pqjax.QuantConfig(method="rtn"), work, **KW)
    assert (work / "manifest.json").read_text() == before


def test_other_calibration_batches_are_refused(folder, finished, tmp_path):
    """A finished folder rerun with different calibration inputs: refused, not the old
    result returned."""
    path, batches = folder
    work = copy_work(finished[1], tmp_path)
    with pytest.raises(CheckpointError, match=r"calibration.sha256"):
        stream_quantize(path, [flux_batch(0), flux_batch(7)], CONFIG, work, **KW)
    with pytest.raises(CheckpointError, match=r"calibration.n_rows: 32 -> 16"):
        stream_quantize(path, batches, CONFIG, work, **{**KW, "n_rows": 16})


def test_weights_replaced_in_place_are_refused(folder, finished, tmp_path):
    """The source's weight file rewritten (new size or time): refused, naming the file."""
    path, batches = folder
    source = tmp_path / "src"
    shutil.copytree(path, source)
    work = tmp_path / "w"
    with pytest.raises(StreamInterrupted):
        stream_quantize(source, batches, CONFIG, work, stop_after=1, **KW)
    shard = sorted(source.glob("*.safetensors"))[-1]
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    with pytest.raises(CheckpointError, match=rf"source.files.{shard.name}.mtime_ns"):
        stream_quantize(source, batches, CONFIG, work, **KW)


@pytest.mark.parametrize("kind", ["block", "aux", "carries"])
def test_a_damaged_finished_block_is_refused(folder, tmp_path, kind):
    """One flipped byte, or a truncation, in a finished block's files: refused, naming the
    file, never loaded."""
    path, batches = folder
    work = tmp_path / "w"
    with pytest.raises(StreamInterrupted):
        stream_quantize(path, batches, CONFIG, work, stop_after=1, **KW)
    name = "transformer_blocks.0" + ("" if kind in ("block", "carries") else f".{kind}")
    target = work / ("carries" if kind == "carries" else "blocks") / f"{name}.safetensors"
    data = bytearray(target.read_bytes())
    data[-3] ^= 0x10
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{target.name}: damaged"):
        stream_quantize(path, batches, CONFIG, work, **KW)
    target.write_bytes(bytes(data[:-100]))
    with pytest.raises(CheckpointError, match=rf"{target.name}: damaged"):
        stream_quantize(path, batches, CONFIG, work, **KW)


def test_a_folder_without_its_manifest_is_refused(folder, finished, tmp_path):
    path, batches = folder
    work = copy_work(finished[1], tmp_path)
    (work / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="not empty and holds no manifest.json"):
        stream_quantize(path, batches, CONFIG, work, **KW)


@pytest.mark.parametrize("damage", ["truncated", "not json", "a list"])
def test_a_corrupted_manifest_names_itself(folder, finished, tmp_path, damage):
    path, batches = folder
    work = copy_work(finished[1], tmp_path)
    manifest = work / "manifest.json"
    text = manifest.read_text()
    manifest.write_text({"truncated": text[: len(text) // 2], "not json": "{oops",
                         "a list": "[]"}[damage])
    with pytest.raises(CheckpointError, match=r"manifest.json: (corrupted|not a pqjax)"):
        stream_quantize(path, batches, CONFIG, work, **KW)


def test_resume_false_refuses_a_folder_with_a_run(folder, finished):
    path, batches = folder
    with pytest.raises(FileExistsError, match="holds a run"):
        stream_quantize(path, batches, CONFIG, finished[1], resume=False, **KW)


def test_a_finished_folder_returns_its_model_without_recomputing(folder, finished, tmp_path):
    path, batches = folder
    work = copy_work(finished[1], tmp_path)
    again, _ = stream_quantize(path, batches, CONFIG, work, **KW)
    a, b = arrays(finished[0]), arrays(again)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    from pqjax.engine.result import load_result

    loaded = arrays(load_result(work))
    for key in a:
        np.testing.assert_array_equal(a[key], loaded[key], err_msg=key)
    assert isinstance(finished[0], nnx.Module)


def test_a_run_killed_in_its_first_block_resumes(folder, finished, tmp_path):
    """The manifest is written before the first block: a run killed before any block finished
    (here: stopped at once, its folder as a kill leaves it) is resumed, not refused."""
    path, batches = folder
    work = tmp_path / "w"
    with pytest.raises(StreamInterrupted):
        stream_quantize(path, batches, CONFIG, work, stop_after=1, **KW)
    manifest = json.loads((work / "manifest.json").read_text())
    manifest["stages"] = {}  # as it stood when the first block began
    (work / "manifest.json").write_text(json.dumps(manifest))
    resumed, _ = stream_quantize(path, batches, CONFIG, work, **KW)
    a, b = arrays(finished[0]), arrays(resumed)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
