"""pqjax.save / pqjax.restore refuse damaged checkpoints, naming the file and the array, and
replace an old checkpoint atomically (issue 15).

One quantized embedded pipeline (RTN int4, no calibration needed) is saved once per module;
each test corrupts its own copy. "Nothing lost or mixed": a restore that succeeds returns
exactly the arrays saved (bit-identical, the same computation read back), and a refused one
leaves every file as it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pqjax
from pqjax import atomic_dir, checkpoint, checksums
from pqjax.checkpoint import META, state_dict
from pqjax.checkpoint_layout import flat
from pqjax.errors import CheckpointError
from pqjax.pipelines.load import EMBEDDED, load_pipeline


def arrays(pipe) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in flat(jax.device_get(state_dict(pipe.transformer))).items()}


def assert_same_arrays(pipe, want: dict[str, np.ndarray]) -> None:
    got = arrays(pipe)
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and np.array_equal(got[k], v), k


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


@pytest.fixture(scope="module")
def pipes():
    """(A, B): the quantized pipeline and a copy whose proj_out bias differs by one."""
    fp = load_pipeline(EMBEDDED)
    config = pqjax.QuantConfig(weights="int4", acts="int4", group=32, method="rtn")
    a = pqjax.quantize_pipeline(fp, {}, config)
    from flax import nnx

    tb = nnx.clone(a.transformer)
    tb.proj_out.bias[...] = tb.proj_out.bias[...] + 1.0
    return a, a.with_transformer(tb, quant_config=a.quant_config, report=a.report)


@pytest.fixture(scope="module")
def saved(pipes, tmp_path_factory):
    """(saved checkpoint folder, its transformer arrays)."""
    out = pqjax.save(pipes[0], tmp_path_factory.mktemp("ckpt") / "q")
    return out, arrays(pipes[0])


@pytest.fixture
def ckpt(saved, tmp_path):
    root = tmp_path / "q"
    shutil.copytree(saved[0], root)
    return root


def transformer_files(root: Path) -> list[Path]:
    data = root / "transformer" / "ocdbt.process_0" / "d"
    return sorted(data.iterdir(), key=lambda p: p.stat().st_size)


def test_checksums_cover_every_file_and_array(saved):
    root, want = saved
    recorded = json.loads((root / checksums.CHECKSUMS).read_text())
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert set(recorded["files"]) == on_disk - {checksums.CHECKSUMS}
    assert META in recorded["files"] and "text_encoder/model.safetensors" in recorded["files"]
    assert recorded["arrays"]["transformer"] == {k: checksums.array_sha256(v)
                                                 for k, v in want.items()}
    assert_same_arrays(pqjax.restore(root), want)


def test_a_flipped_bit_in_an_array_file_names_the_file_and_the_array(ckpt, saved):
    # before: restored without error, with a changed transformer array (one codes tensor)
    target = transformer_files(ckpt)[-1]
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x10
    target.write_bytes(bytes(data))
    before = snapshot(ckpt)
    with pytest.raises(CheckpointError) as e:
        pqjax.restore(ckpt)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"transformer/ocdbt.process_0/d/{target.name}: content differs" in msg
    changed = [k for k, v in saved[1].items() if k in msg]  # the diagnosis names the array
    assert len(changed) >= 1 and "arrays that differ" in msg
    assert snapshot(ckpt) == before


@pytest.mark.parametrize("which", ["smallest data file", "manifest.ocdbt", "process manifest"])
def test_a_deleted_file_is_named(ckpt, which):
    # before: the smallest data file and ocdbt.process_0/manifest.ocdbt went unnoticed;
    # manifest.ocdbt read "no array for context_embedder.bias"
    path = {"smallest data file": transformer_files(ckpt)[0],
            "manifest.ocdbt": ckpt / "transformer" / "manifest.ocdbt",
            "process manifest": ckpt / "transformer" / "ocdbt.process_0" / "manifest.ocdbt"}[which]
    path.unlink()
    with pytest.raises(CheckpointError) as e:
        pqjax.restore(ckpt)
    rel = path.relative_to(ckpt).as_posix()
    assert f"damaged checkpoint: {rel}: missing" in str(e.value)
    assert "\n" not in str(e.value)


def test_a_missing_data_file_without_checksums_is_one_line(ckpt):
    # before: a 61-line message holding the TensorStore spec (420 lines of CLI stderr);
    # a format-1 checkpoint (no checksums.json) still reaches orbax: its error is cut to a line
    meta = json.loads((ckpt / META).read_text())
    meta["format_version"] = 1
    (ckpt / META).write_text(json.dumps(meta))
    (ckpt / checksums.CHECKSUMS).unlink()
    transformer_files(ckpt)[-1].unlink()
    with pytest.warns(UserWarning, match="no checksums"), pytest.raises(CheckpointError) as e:
        pqjax.restore(ckpt)
    msg = str(e.value)
    assert msg.startswith(f"{ckpt / 'transformer'}: cannot be read") and "\n" not in msg
    assert "TensorStore({" not in msg and len(msg) < 400


def test_format_1_without_checksums_restores_with_a_warning(ckpt, saved):
    meta = json.loads((ckpt / META).read_text())
    meta["format_version"] = 1
    (ckpt / META).write_text(json.dumps(meta))
    (ckpt / checksums.CHECKSUMS).unlink()
    with pytest.warns(UserWarning, match="format_version 1 has no checksums"):
        restored = pqjax.restore(ckpt)
    assert_same_arrays(restored, saved[1])


def test_missing_manifest_ocdbt_without_checksums_names_it(ckpt):
    (ckpt / checksums.CHECKSUMS).unlink()
    meta = json.loads((ckpt / META).read_text())
    meta["format_version"] = 1
    (ckpt / META).write_text(json.dumps(meta))
    (ckpt / "transformer" / "manifest.ocdbt").unlink()
    with pytest.warns(UserWarning), \
            pytest.raises(CheckpointError, match="manifest.ocdbt is missing"):
        pqjax.restore(ckpt)


def test_a_damaged_text_encoder_file_is_named(ckpt):
    # before: 8 zeroed bytes at the end of text_encoder/model.safetensors restored silently
    path = ckpt / "text_encoder" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-8] + bytes(8))
    with pytest.raises(CheckpointError, match=r"text_encoder/model\.safetensors: content differs"):
        pqjax.restore(ckpt)


def test_a_truncated_file_is_named_by_its_size(ckpt):
    path = ckpt / "text_encoder" / "model.safetensors"
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: 100 bytes, {size} when saved"):
        pqjax.restore(ckpt)


@pytest.mark.parametrize("damage", ["invalid JSON", "missing"])
def test_damaged_checksums_json_is_named(ckpt, damage):
    path = ckpt / checksums.CHECKSUMS
    if damage == "missing":
        path.unlink()
    else:
        path.write_text(path.read_text()[:50])
    with pytest.raises(CheckpointError, match=r"checksums\.json"):
        pqjax.restore(ckpt)


def test_a_corrupt_report_is_dropped_with_a_warning(ckpt, saved):
    # before: a bare JSONDecodeError blocked the restore. The report describes the
    # quantization but is not needed to run the model: the model restores, the report is
    # dropped, and the warning names the file.
    (ckpt / "report" / "report.json").write_text("{oops")
    with pytest.warns(UserWarning, match=r"report/report\.json"):
        restored = pqjax.restore(ckpt)
    assert restored.report is None
    assert_same_arrays(restored, saved[1])


def test_a_corrupt_report_without_checksums_is_dropped_with_a_warning(ckpt, saved):
    meta = json.loads((ckpt / META).read_text())
    meta["format_version"] = 1
    (ckpt / META).write_text(json.dumps(meta))
    (ckpt / checksums.CHECKSUMS).unlink()
    (ckpt / "report" / "report.json").write_text("{oops")
    with pytest.warns(UserWarning) as record:
        restored = pqjax.restore(ckpt)
    assert restored.report is None
    assert any("report.json: unreadable (JSONDecodeError" in str(w.message) for w in record)


# ---- atomic overwrite -------------------------------------------------------------------


def test_overwrite_refuses_a_folder_that_is_not_a_checkpoint(pipes, tmp_path):
    # before: overwrite=True deleted the folder, user files and all
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match=r"mine is not a pqjax checkpoint.*refusing"):
        pqjax.save(pipes[0], out, overwrite=True)
    assert (out / "notes.txt").read_text() == "keep me"
    assert siblings(out) == []  # no temporary folder left


def test_overwrite_replaces_the_checkpoint_whole(pipes, ckpt):
    assert pqjax.save(pipes[1], ckpt, overwrite=True) == ckpt.resolve()
    assert_same_arrays(pqjax.restore(ckpt), arrays(pipes[1]))
    assert siblings(ckpt) == []


def during_replace(monkeypatch, **patches):
    """Apply `patches` (os / shutil attribute -> function) only while replace_dir runs."""
    real = checkpoint.replace_dir

    def patched(new, out):
        with monkeypatch.context() as m:
            for name, fn in patches.items():
                m.setattr(os if hasattr(os, name) else shutil, name, fn)
            real(new, out)

    monkeypatch.setattr(checkpoint, "replace_dir", patched)


def as_dead(path: Path) -> Path:
    """Rename a leftover as if the process that wrote it had died."""
    name = re.sub(r"-\d+-([0-9a-f]{8})$", rf"-{dead_pid()}-\1", path.name)
    return path.rename(path.with_name(name))


def test_a_kill_while_deleting_the_old_checkpoint_leaves_the_new_one(pipes, ckpt, monkeypatch):
    # before: the old checkpoint was deleted in place, then the new one renamed in; a kill
    # during the delete left a half-deleted old checkpoint at the target
    def killed_midway(path, *args, **kwargs):
        for f in sorted(Path(path).rglob("*"))[:5]:
            if f.is_file():
                f.unlink()
        raise KeyboardInterrupt("killed while deleting the old checkpoint")

    during_replace(monkeypatch, rmtree=killed_midway)
    with pytest.raises(KeyboardInterrupt):
        pqjax.save(pipes[1], ckpt, overwrite=True)
    monkeypatch.undo()
    with pytest.warns(UserWarning, match=r"an interrupted save left \.q\.old-"):
        assert_same_arrays(pqjax.restore(ckpt), arrays(pipes[1]))  # the new one, complete
    (left,) = atomic_dir.leftovers(ckpt)
    assert ".old-" in left.name
    as_dead(left)
    pqjax.save(pipes[0], ckpt, overwrite=True)  # the next save removes the dead one's leftover
    assert siblings(ckpt) == []
    assert_same_arrays(pqjax.restore(ckpt), arrays(pipes[0]))


def test_a_failed_rename_puts_the_old_checkpoint_back(pipes, ckpt, monkeypatch):
    real_replace = os.replace
    calls = []

    def fail_second(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # old -> aside worked; new -> target fails
            raise OSError("disk full")
        return real_replace(src, dst)

    during_replace(monkeypatch, replace=fail_second)
    with pytest.raises(OSError, match="disk full"):
        pqjax.save(pipes[1], ckpt, overwrite=True)
    monkeypatch.undo()
    assert len(calls) == 3  # aside, (failed) in, back
    assert_same_arrays(pqjax.restore(ckpt), arrays(pipes[0]))  # the old one, untouched
    assert siblings(ckpt) == []


def test_a_kill_between_the_renames_is_named_at_restore(pipes, ckpt, tmp_path):
    # The state a kill between "old aside" and "new in" leaves: no target, both siblings.
    pqjax.save(pipes[1], tmp_path / "b")
    old = as_dead(ckpt.rename(atomic_dir.temp_sibling(ckpt, "old")))
    new = as_dead((tmp_path / "b").rename(atomic_dir.temp_sibling(ckpt)))
    with pytest.raises(CheckpointError) as e:
        pqjax.restore(ckpt)
    assert f"{ckpt} does not exist; an interrupted save left" in str(e.value)
    assert f"rename {new} to {ckpt} to use the new one" in str(e.value)
    new.rename(ckpt)  # what the message says to do
    with pytest.warns(UserWarning, match=old.name):
        assert_same_arrays(pqjax.restore(ckpt), arrays(pipes[1]))


def test_a_kill_while_writing_leaves_the_old_checkpoint(pipes, ckpt, monkeypatch):
    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing the decoder")

    monkeypatch.setattr(type(pipes[0].decoder), "save", killed)
    with pytest.raises(KeyboardInterrupt):
        pqjax.save(pipes[1], ckpt, overwrite=True)
    monkeypatch.undo()
    assert siblings(ckpt) == []  # the partial temporary folder is removed
    assert_same_arrays(pqjax.restore(ckpt), arrays(pipes[0]))


def test_leftovers_of_a_live_writer_are_kept_and_named(ckpt, pipes):
    live = atomic_dir.temp_sibling(ckpt)  # this process: still alive
    live.mkdir()
    with pytest.warns(UserWarning, match=live.name):
        pqjax.save(pipes[0], ckpt, overwrite=True)
    assert live.is_dir()


def dead_pid() -> int:
    """The id of a process that has exited."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def test_array_digest_separates_dtype_and_shape():
    x = jnp.arange(4, dtype=jnp.float32)
    assert checksums.array_sha256(x) != checksums.array_sha256(x.reshape(2, 2))
    assert checksums.array_sha256(x) != checksums.array_sha256(x.view(jnp.int32))
    assert checksums.array_sha256(x) == checksums.array_sha256(np.arange(4, dtype=np.float32))
