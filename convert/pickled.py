"""Opt-in reader for pickled torch checkpoints (`.bin`, `.pt`), with `weights_only=True`.

Only reached when the caller passes `allow_pickle=True`; torch is imported here and nowhere
else in the loading path.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np

from convert.safetensors_io import CheckpointError


def _to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu().contiguous()
    views = {
        torch.bfloat16: (torch.int16, ml_dtypes.bfloat16),
        torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn),
        torch.float8_e5m2: (torch.uint8, ml_dtypes.float8_e5m2),
    }
    if t.dtype in views:
        raw, target = views[t.dtype]
        return t.view(raw).numpy().view(target)
    return t.numpy()


class PickledCheckpoint:
    """A set of pickled state dicts, loaded lazily one file at a time."""

    def __init__(self, files: list[Path]):
        import torch

        self._tensors: dict[str, object] = {}
        self._file: dict[str, Path] = {}
        for path in files:
            # mmap (tensors paged in on read) needs the zip format of torch >= 1.6; files from
            # the legacy `_use_new_zipfile_serialization=False` writer load into memory.
            mmap = zipfile.is_zipfile(path)
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except Exception as e:  # torch raises many types for bad pickles
                raise CheckpointError(
                    f"{path}: cannot load as a {'zip' if mmap else 'legacy (non-zip)'} torch "
                    f"checkpoint with weights_only=True: {e}"
                ) from e
            if not isinstance(state, dict):
                raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
            for key, value in state.items():
                self._tensors[key] = value
                self._file[key] = path

    def keys(self) -> list[str]:
        return list(self._tensors)

    def read(self, key: str) -> np.ndarray:
        return _to_numpy(self._tensors[key])

    def file_of(self, key: str) -> Path:
        return self._file[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(getattr(self._tensors[key], "shape", ()))

    def dtype(self, key: str) -> np.dtype:
        """The stored dtype as numpy names it (bf16 and fp8 through ml_dtypes)."""
        name = str(getattr(self._tensors[key], "dtype", "torch.float32")).removeprefix("torch.")
        names = {"float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
                 "bfloat16": ml_dtypes.bfloat16}
        try:
            return np.dtype(names.get(name, name))
        except TypeError:  # integer and bool buffers and the like: not a weight dtype
            return np.dtype(np.int64)
