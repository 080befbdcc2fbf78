"""Streaming safetensors I/O with numpy + ml_dtypes (no torch).

Reads one tensor at a time from a single file or a sharded checkpoint
(`*.safetensors.index.json`), so converting never holds two copies of a model. Every error
names the file and, where there is one, the tensor key.

Format (https://github.com/huggingface/safetensors): 8-byte little-endian header length N,
N bytes of JSON `{key: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`,
then the byte buffer; offsets are relative to the buffer start.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath

import ml_dtypes
import numpy as np

from pqjax.errors import CheckpointError

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100_000_000  # the reference reader's limit


def _is_size(v: object) -> bool:
    """A JSON value that is a usize for the reference reader: an int >= 0 (bool is not)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_inside(index: Path, name: str) -> None:
    """A shard name is a relative path inside the index's folder: no root, drive or `..`.

    Checked on the name, not the resolved path: Hugging Face cache snapshots are symlinks into
    `blobs/`, which is outside the folder and fine.
    """
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if not name or name.startswith(("/", "\\")) or ":" in name or ".." in parts:
        raise CheckpointError(
            f"{index}: shard name {name!r} leaves the model folder {index.parent}; shard names "
            "must be file names inside it"
        )


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    key: str
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int
    path: Path


class SafetensorsFile:
    """One `.safetensors` file: parses and validates the header; reads tensors on demand.

    At least as strict as the reference reader: the header is UTF-8 JSON without duplicate keys,
    every entry has a known dtype, a shape of non-negative ints and `data_offsets` that hold
    exactly that many bytes, and the tensors tile the byte buffer with no gap, overlap or
    trailing byte ("invalid offset", "file not fully covered").
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such file")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(
                    f"{self.path}: truncated: {size} bytes, no safetensors header"
                )
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise CheckpointError(
                    f"{self.path}: corrupted or truncated: header claims {n} bytes, file has {size}"
                )
            try:
                header = json.loads(f.read(n).decode("utf-8"), object_pairs_hook=_unique_keys)
            except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
                raise CheckpointError(f"{self.path}: corrupted header JSON: {e}") from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupted header: not a JSON object")
        metadata = header.pop("__metadata__", None)
        metadata = {} if metadata is None else metadata
        if not isinstance(metadata, dict) or not all(
            isinstance(v, str) for v in metadata.values()
        ):
            raise CheckpointError(
                f"{self.path}: corrupted header: __metadata__ must map strings to strings, "
                f"got {metadata!r}"
            )
        self.metadata: dict[str, str] = metadata
        data_start = 8 + n
        self.tensors: dict[str, TensorInfo] = {}
        for key, entry in header.items():
            self.tensors[key] = self._info(key, entry, data_start, size)
        self._check_coverage(data_start, size)

    def _info(self, key: str, entry: object, data_start: int, size: int) -> TensorInfo:
        try:
            dtype_name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(
                f"{self.path}: key {key!r}: malformed header entry {entry!r}"
            ) from e
        if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
            raise CheckpointError(
                f"{self.path}: key {key!r}: unsupported dtype {dtype_name!r}; "
                f"supported: {sorted(DTYPES)}"
            )
        if not (isinstance(shape, list) and all(_is_size(s) for s in shape)):
            raise CheckpointError(
                f"{self.path}: key {key!r}: shape {shape!r} is not a list of non-negative ints"
            )
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_size, offsets))):
            raise CheckpointError(
                f"{self.path}: key {key!r}: data_offsets {offsets!r} are not two non-negative ints"
            )
        dtype = DTYPES[dtype_name]
        begin, end = offsets
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            raise CheckpointError(
                f"{self.path}: key {key!r}: data_offsets {begin}..{end} do not hold "
                f"{dtype_name} {list(shape)} ({nbytes} bytes)"
            )
        if data_start + end > size:
            raise CheckpointError(
                f"{self.path}: truncated: key {key!r} ends at byte {data_start + end}, "
                f"file has {size} bytes"
            )
        return TensorInfo(key, dtype, tuple(shape), data_start + begin, data_start + end, self.path)

    def _check_coverage(self, data_start: int, size: int) -> None:
        """The tensors, in offset order, must tile the buffer [data_start, size) exactly."""
        pos = data_start
        for info in sorted(self.tensors.values(), key=lambda i: (i.begin, i.end)):
            if info.begin != pos:
                raise CheckpointError(
                    f"{self.path}: invalid offset for key {info.key!r}: its data starts at "
                    f"buffer byte {info.begin - data_start}, the previous tensor ends at "
                    f"{pos - data_start} (tensors overlap or leave a gap)"
                )
            pos = info.end
        if pos != size:
            raise CheckpointError(
                f"{self.path}: file not fully covered: the tensors end at byte {pos}, the file "
                f"has {size} bytes ({size - pos} trailing bytes)"
            )

    def read(self, key: str) -> np.ndarray:
        """The tensor `key` as a fresh numpy array in its stored dtype."""
        info = self.tensors[key]
        out = host_array(info.shape, info.dtype)
        buf = out.reshape(-1).view(np.uint8)
        with open(self.path, "rb") as f:
            f.seek(info.begin)
            if f.readinto(buf) != len(buf):
                raise CheckpointError(f"{self.path}: truncated while reading key {key!r}")
        return out


MMAP_MIN_BYTES = 1 << 20  # smaller tensors (norms, biases) come from the heap


def host_array(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array, in its own anonymous memory map when it is 1 MiB or more.

    Freeing it returns the pages to the OS at once. Tensor-sized temporaries from malloc stay
    in the heap between the long-lived weights instead (glibc raises its mmap threshold after
    the first large free), which adds ~15% to the peak when a model is loaded one tensor at a
    time. Small tensors stay on the heap, so the number of maps (Linux allows ~65k per
    process by default) grows with the large weights only.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes < MMAP_MIN_BYTES:
        return np.empty(shape, dtype)
    return np.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).reshape(shape)


class Checkpoint:
    """A set of tensors spread over one or more safetensors files, read one at a time."""

    def __init__(self, files: list[SafetensorsFile], source: Path):
        self.source = source
        self._where: dict[str, SafetensorsFile] = {}
        for f in files:
            for key in f.tensors:
                if key in self._where:
                    raise CheckpointError(
                        f"{f.path}: key {key!r} also stored in {self._where[key].path}"
                    )
                self._where[key] = f

    @classmethod
    def open(cls, path: str | os.PathLike) -> Checkpoint:
        """A `.safetensors` file or a `*.safetensors.index.json` of shards."""
        path = Path(path)
        if path.name.endswith(".index.json"):
            return cls._open_index(path)
        return cls([SafetensorsFile(path)], path)

    @classmethod
    def _open_index(cls, index: Path) -> Checkpoint:
        try:
            doc = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise CheckpointError(
                f"{index}: not a valid safetensors index: \"weight_map\" must map tensor keys "
                f"to shard file names, got {type(weight_map).__name__}"
            )
        shards = {}
        for name in sorted(set(weight_map.values())):
            _check_inside(index, name)
            shard = index.parent / name
            if not shard.is_file():
                raise CheckpointError(f"{index}: shard {name!r} is missing (looked for {shard})")
            shards[name] = SafetensorsFile(shard)
        ckpt = cls(list(shards.values()), index)
        for key, name in weight_map.items():
            if key not in shards[name].tensors:
                raise CheckpointError(
                    f"{index}: key {key!r} is listed in {name} but not stored there"
                )
        return ckpt

    def keys(self) -> list[str]:
        return list(self._where)

    def info(self, key: str) -> TensorInfo:
        return self._where[key].tensors[key]

    def file_of(self, key: str) -> Path:
        return self._where[key].path

    def shape(self, key: str) -> tuple[int, ...]:
        return self.info(key).shape

    def dtype(self, key: str) -> np.dtype:
        return self.info(key).dtype

    def read(self, key: str) -> np.ndarray:
        return self._where[key].read(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    key: str
    shape: tuple[int, ...]
    dtype: np.dtype


def write_safetensors(
    path: str | os.PathLike,
    specs: Iterable[TensorSpec],
    get: Callable[[str], np.ndarray],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write tensors one at a time; `get(key)` produces each array when its turn comes.

    Writes to a temporary name and renames, so a crash never leaves a half-written file.
    Returns the number of bytes written.
    """
    path = Path(path)
    specs = list(specs)
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for s in specs:
        if np.dtype(s.dtype) not in DTYPE_NAMES:
            raise CheckpointError(f"{path}: key {s.key!r}: dtype {s.dtype} has no safetensors name")
        nbytes = int(np.prod(s.shape, dtype=np.int64)) * np.dtype(s.dtype).itemsize
        header[s.key] = {
            "dtype": DTYPE_NAMES[np.dtype(s.dtype)],
            "shape": list(s.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # 8-byte alignment of the buffer, as the reference writer does
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for s in specs:
                arr = _c_order(get(s.key))
                if arr.shape != tuple(s.shape) or arr.dtype != np.dtype(s.dtype):
                    raise CheckpointError(
                        f"{path}: key {s.key!r}: got {arr.dtype} {arr.shape}, declared "
                        f"{np.dtype(s.dtype)} {tuple(s.shape)}"
                    )
                f.write(arr.tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a failed or interrupted write leaves neither file nor temporary
        tmp.unlink(missing_ok=True)
        raise
    return 8 + len(blob) + offset


def _c_order(a: object) -> np.ndarray:
    """`a` as a C-contiguous array of the same shape (np.ascontiguousarray makes 0-d arrays 1-d)."""
    arr = np.asarray(a)
    return arr if arr.flags.c_contiguous else arr.copy(order="C")
