"""The streaming safetensors reader/writer, checked against the `safetensors` package itself."""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from convert.safetensors_io import (
    Checkpoint,
    CheckpointError,
    SafetensorsFile,
    TensorSpec,
    write_safetensors,
)


def test_reads_files_written_by_the_reference_library(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "a.f32": rng.standard_normal((3, 5)).astype(np.float32),
        "b.f16": rng.standard_normal((7,)).astype(np.float16),
        "c.i64": np.arange(6, dtype=np.int64).reshape(2, 3),
        "d.scalar": np.array(2.5, np.float32),
        "e.empty": np.zeros((0, 4), np.float32),
    }
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    ckpt = Checkpoint.open(tmp_path / "x.safetensors")
    assert sorted(ckpt.keys()) == sorted(tensors)
    for key, want in tensors.items():
        got = ckpt.read(key)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "dtype", [ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2, np.float16]
)
def test_low_precision_dtypes_round_trip_bit_exact(tmp_path, dtype):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as save_torch

    values = np.random.default_rng(1).standard_normal((4, 9)).astype(np.float32)
    t = torch.from_numpy(values).to(
        {
            ml_dtypes.bfloat16: torch.bfloat16,
            ml_dtypes.float8_e4m3fn: torch.float8_e4m3fn,
            ml_dtypes.float8_e5m2: torch.float8_e5m2,
            np.float16: torch.float16,
        }[dtype]
    )
    save_torch({"w": t}, tmp_path / "t.safetensors")  # written by torch, read without it
    got = Checkpoint.open(tmp_path / "t.safetensors").read("w")
    assert got.dtype == np.dtype(dtype)
    # The same values as torch's own cast (ml_dtypes and torch both round to nearest even).
    want = t.float().numpy()
    np.testing.assert_array_equal(got.astype(np.float32), want)


def test_writer_output_loads_in_the_reference_library(tmp_path):
    from safetensors.numpy import load_file

    arrays = {"x": np.arange(12, dtype=np.float32).reshape(3, 4), "y": np.ones(5, np.int32)}
    specs = [TensorSpec(k, v.shape, v.dtype) for k, v in arrays.items()]
    write_safetensors(tmp_path / "w.safetensors", specs, arrays.__getitem__)
    loaded = load_file(tmp_path / "w.safetensors")
    for k, v in arrays.items():
        np.testing.assert_array_equal(loaded[k], v)
    assert not list(tmp_path.glob("*.tmp"))


def test_writer_rejects_an_array_that_differs_from_its_spec(tmp_path):
    spec = [TensorSpec("x", (2, 2), np.dtype(np.float32))]
    with pytest.raises(CheckpointError, match="'x'"):
        write_safetensors(tmp_path / "w.safetensors", spec, lambda k: np.zeros((3,), np.float32))
    assert not (tmp_path / "w.safetensors").exists()


def _sharded(tmp_path):
    save_file({"a": np.ones((2,), np.float32)}, tmp_path / "m-1.safetensors")
    save_file({"b": np.zeros((3,), np.float32)}, tmp_path / "m-2.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "m-1.safetensors", "b": "m-2.safetensors"}}
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps(index))
    return tmp_path / "m.safetensors.index.json"


def test_sharded_checkpoint(tmp_path):
    ckpt = Checkpoint.open(_sharded(tmp_path))
    assert sorted(ckpt.keys()) == ["a", "b"]
    assert ckpt.file_of("b").name == "m-2.safetensors"
    np.testing.assert_array_equal(ckpt.read("b"), np.zeros(3, np.float32))


def test_missing_shard_is_named(tmp_path):
    index = _sharded(tmp_path)
    (tmp_path / "m-2.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"m-2\.safetensors"):
        Checkpoint.open(index)


def test_index_listing_a_key_its_shard_lacks(tmp_path):
    index = _sharded(tmp_path)
    data = json.loads(index.read_text())
    data["weight_map"]["c"] = "m-1.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="'c'"):
        Checkpoint.open(index)


def test_truncated_file_names_file_and_key(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"first": np.ones(4, np.float32), "second": np.ones(1000, np.float32)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"t\.safetensors.*truncated.*'second'"):
        SafetensorsFile(path)


@pytest.mark.parametrize(
    "content, match",
    [
        (b"\x01\x02", "truncated"),
        (struct.pack("<Q", 10**9) + b"{}", "header claims"),
        (struct.pack("<Q", 5) + b"{nope", "corrupted header JSON"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
    ],
)
def test_corrupted_headers(tmp_path, content, match):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match) as e:
        SafetensorsFile(path)
    assert "bad.safetensors" in str(e.value)


def test_unknown_dtype_and_inconsistent_offsets(tmp_path):
    def write(header: dict) -> None:
        blob = json.dumps(header).encode()
        (tmp_path / "h.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * 64)

    write({"w": {"dtype": "C64", "shape": [2], "data_offsets": [0, 16]}})
    with pytest.raises(CheckpointError, match=r"'w'.*unsupported dtype 'C64'"):
        SafetensorsFile(tmp_path / "h.safetensors")
    write({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})
    with pytest.raises(CheckpointError, match=r"'w'.*do not hold F32"):
        SafetensorsFile(tmp_path / "h.safetensors")


def test_host_array_maps_only_large_tensors():
    """Large temporaries get their own page map (returned to the OS when freed); small ones
    come from the heap, so a model's many norms and biases do not use up the map count."""
    import mmap

    from convert.safetensors_io import MMAP_MIN_BYTES, host_array

    def root(a):
        while isinstance(a, np.ndarray) and a.base is not None:
            a = a.base
        return a.obj if isinstance(a, memoryview) else a

    small = host_array((3, 7), np.float32)
    large = host_array((MMAP_MIN_BYTES // 2,), np.uint16)
    assert small.shape == (3, 7) and small.dtype == np.float32 and small.flags.owndata
    assert large.shape == (MMAP_MIN_BYTES // 2,) and isinstance(root(large), mmap.mmap)
    assert large.flags.writeable
