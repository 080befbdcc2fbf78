"""Fuzz our safetensors reader against the reference `safetensors` library (its Rust parser).

Random files: 0-4 tensors of random dtypes and shapes, laid out in a random order, then one
random defect (shifted, overlapping or swapped offsets, bad shapes or dtypes, trailing bytes,
truncation, a wrong header length, a flipped header byte, bad metadata). The rule: whatever the
reference refuses we refuse with a CheckpointError (we may refuse more: e.g. dtypes we do not
read, duplicate JSON keys); whatever both accept reads back bit-identical; a file without a defect
in a dtype we read is accepted by both.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import safetensors
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from convert.safetensors_io import DTYPES, CheckpointError, SafetensorsFile

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8,
            "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "U16": 2, "U32": 4}
# U16/U32: the reference reads them, we do not (refusing is allowed, stricter).

tensor = st.tuples(
    st.sampled_from(sorted(ITEMSIZE)),
    st.lists(st.integers(0, 4), min_size=0, max_size=3),
)
DEFECTS = ("none", "shift_begin", "shift_end", "shift_both", "overlap", "swap", "trailing",
           "truncate", "header_len", "flip_header_byte", "bad_shape", "bad_dtype",
           "bad_metadata", "reorder_only")


def _build(tensors: list[tuple[str, list[int]]], order: list[int], data: st.DataObject):
    """A valid header (dict) and buffer (bytes) for `tensors`, stored in `order`."""
    header: dict[str, object] = {}
    buf = bytearray()
    for i in order:
        dtype, shape = tensors[i]
        n = int(np.prod(shape, dtype=np.int64)) * ITEMSIZE[dtype]
        if dtype == "BOOL":  # the reference refuses no bool bytes, but keep them 0/1 to be safe
            payload = bytes(data.draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)))
        else:
            payload = data.draw(st.binary(min_size=n, max_size=n))
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [len(buf), len(buf) + n]}
        buf += payload
    return header, bytes(buf)


def _serialize(header: dict, buf: bytes, pad: int) -> bytes:
    blob = json.dumps(header).encode() + b" " * pad
    return struct.pack("<Q", len(blob)) + blob + buf


def _defect(kind: str, header: dict, buf: bytes, pad: int, data: st.DataObject) -> bytes:
    keys = [k for k in header if k != "__metadata__"]
    pick = (lambda: data.draw(st.sampled_from(keys))) if keys else None
    delta = data.draw(st.sampled_from([-8, -4, -2, -1, 1, 2, 4, 8]))
    if kind in ("shift_begin", "shift_end", "shift_both") and keys:
        off = header[pick()]["data_offsets"]
        if kind != "shift_end":
            off[0] = max(0, off[0] + delta)
        if kind != "shift_begin":
            off[1] = max(0, off[1] + delta)
    elif kind == "overlap" and len(keys) >= 2:
        a, b = data.draw(st.permutations(keys))[:2]
        header[a]["data_offsets"] = list(header[b]["data_offsets"])
        header[a]["shape"], header[a]["dtype"] = header[b]["shape"], header[b]["dtype"]
    elif kind == "swap" and len(keys) >= 2:
        a, b = data.draw(st.permutations(keys))[:2]
        header[a]["data_offsets"], header[b]["data_offsets"] = (
            header[b]["data_offsets"], header[a]["data_offsets"])
    elif kind == "bad_shape" and keys:
        header[pick()]["shape"] = data.draw(st.sampled_from(
            [[-1], [-1, -2], [2.0], ["2"], None, [True], 3, [[1]]]))
    elif kind == "bad_dtype" and keys:
        header[pick()]["dtype"] = data.draw(st.sampled_from(["f32", "F128", 4, None, "", "I128"]))
    elif kind == "bad_metadata":
        header["__metadata__"] = data.draw(st.sampled_from(
            [{"format": "pt"}, {"a": 1}, [], "pt", None, {"a": None}, {"a": {"b": "c"}}]))
    elif kind == "reorder_only":
        header = dict(data.draw(st.permutations(list(header.items()))))
    raw = _serialize(header, buf, pad)
    if kind == "trailing":
        raw += data.draw(st.binary(min_size=1, max_size=9))
    elif kind == "truncate" and len(raw) > 0:
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "header_len":
        (n,) = struct.unpack("<Q", raw[:8])
        raw = struct.pack("<Q", max(0, n + delta)) + raw[8:]
    elif kind == "flip_header_byte":
        (n,) = struct.unpack("<Q", raw[:8])
        if n:
            i = 8 + data.draw(st.integers(0, n - 1))
            raw = raw[:i] + bytes([raw[i] ^ (1 << data.draw(st.integers(0, 7)))]) + raw[i + 1:]
    return raw


def _reference(raw: bytes) -> dict[str, tuple[str, list[int], bytes]] | None:
    try:
        return {k: (v["dtype"], list(v["shape"]), bytes(v["data"]))
                for k, v in safetensors.deserialize(raw)}
    except Exception:  # SafetensorError, or a JSON-level refusal
        return None


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "f.safetensors"


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    tensors=st.lists(tensor, min_size=0, max_size=4),
    kind=st.sampled_from(DEFECTS),
    pad=st.integers(0, 7),
    data=st.data(),
)
def test_reader_agrees_with_the_reference_or_is_stricter(scratch, tensors, kind, pad, data):
    order = data.draw(st.permutations(range(len(tensors))))
    header, buf = _build(tensors, order, data)
    raw = _defect(kind, header, buf, pad, data)
    scratch.write_bytes(raw)
    want = _reference(raw)
    try:
        f = SafetensorsFile(scratch)
        got = {k: (next(n for n, d in DTYPES.items() if d == i.dtype), list(i.shape),
                   f.read(k).tobytes()) for k, i in f.tensors.items()}
    except CheckpointError as e:
        assert str(scratch) in str(e)  # every refusal names the file
        got = None
    event(f"reference {'refuses' if want is None else 'accepts'}, we "
          f"{'refuse' if got is None else 'accept'}")  # see --hypothesis-show-statistics
    if want is None:
        assert got is None, f"{kind}: we accepted a file the reference refuses: {got}"
        return
    if got is not None:  # both accept: the same keys, dtypes, shapes and bytes
        assert got == want
    elif kind in ("none", "reorder_only", "bad_metadata") and all(
        d in DTYPES for d, _ in tensors
    ) and header.get("__metadata__", {}) in ({}, {"format": "pt"}, None):
        pytest.fail(f"{kind}: we refused a valid file the reference reads: {raw[:200]!r}")


def test_fuzz_defects_each_refused_as_the_reference_does(tmp_path):
    """The three named cases of issue 15, deterministic: both readers refuse each."""
    a = np.arange(4, dtype=np.float32)
    cases = {
        "overlap": ({"a": [0, 16], "b": [0, 16]}, a.tobytes(), "invalid offset"),
        "shift by 4": ({"a": [4, 20]}, b"\0" * 4 + a.tobytes(), "invalid offset"),
        "trailing garbage": ({"a": [0, 16]}, a.tobytes() + b"junk", "not fully covered"),
    }
    for name, (offsets, buf, ours) in cases.items():
        header = {k: {"dtype": "F32", "shape": [4], "data_offsets": v} for k, v in offsets.items()}
        raw = _serialize(header, buf, 0)
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(raw)
        with pytest.raises(safetensors.SafetensorError):
            safetensors.deserialize(raw)
        with pytest.raises(CheckpointError, match=ours):
            SafetensorsFile(path)
