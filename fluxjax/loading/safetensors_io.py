"""Read safetensors checkpoints one tensor at a time, without torch.

A `TensorSource` covers one `.safetensors` file, a folder holding one, or a sharded folder with
its `*.safetensors.index.json`. Tensors are read one at a time with plain reads (a memory map
would keep every page it touched resident, so the process would grow to the file's size), so
the host never holds more than the tensor being converted. bf16 (and fp8) come back as the
ml_dtypes NumPy types, which safetensors' own NumPy loader cannot produce.
"""

from __future__ import annotations

import glob
import json
import os
import struct
from typing import Iterator

import ml_dtypes
import numpy as np

from fluxjax.errors import CheckpointError, check_regular_file

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}


class _File:
    """The header of one safetensors file and lazy access to its tensors."""

    def __init__(self, path: str):
        self.path = path
        check_regular_file(path, error=CheckpointError)  # a FIFO would block the open below forever
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{path}: too short to be a safetensors file ({size} bytes)")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8:
                    raise CheckpointError(f"{path}: header length {n} exceeds the file size {size}: truncated or not safetensors")
                header = json.loads(f.read(n))
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no such file") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: header is not valid JSON ({e}); not a safetensors file?") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: header is not a JSON object; not a safetensors file?")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.entries = header
        for key, e in header.items():
            if not _well_formed(e):
                raise CheckpointError(f"{path}: header entry {key!r} is not {{dtype, shape, data_offsets: [begin, end]}}")
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self.data_start + end > size:
            raise CheckpointError(
                f"{path}: truncated: the header describes {self.data_start + end} bytes, the file has {size}"
            )
        _check_tiling(path, header, size - self.data_start)
        for key, e in header.items():
            begin, stop = e["data_offsets"]
            if e["dtype"] in DTYPES and stop - begin != int(np.prod(e["shape"])) * DTYPES[e["dtype"]].itemsize:
                raise CheckpointError(
                    f"{path}: corrupt: tensor {key!r} ({e['dtype']} {e['shape']}) spans {stop - begin} bytes, "
                    f"expected {int(np.prod(e['shape'])) * DTYPES[e['dtype']].itemsize}"
                )

    def read(self, key: str) -> np.ndarray:
        entry = self.entries[key]
        if entry["dtype"] not in DTYPES:
            raise CheckpointError(f"{self.path}: tensor {key!r} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        out = np.empty(entry["shape"], DTYPES[entry["dtype"]])
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            got = f.readinto(out.reshape(-1).view(np.uint8))
        if got != end - begin:
            raise CheckpointError(f"{self.path}: tensor {key!r} ends after {got} of {end - begin} bytes: the file shrank")
        return out


def _well_formed(entry) -> bool:
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    return (isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and isinstance(entry.get("shape"), list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry["shape"])
            and isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets) and 0 <= offsets[0] <= offsets[1])


def _check_tiling(path: str, header: dict, data_bytes: int) -> None:
    """The tensors' byte ranges must cover the data section exactly, end to end, as the
    safetensors format requires (its own library refuses anything else): overlapping ranges would
    let one tensor's bytes be read as another's, a gap or a tail hides bytes no tensor owns."""
    at, previous = 0, None
    for key, e in sorted(header.items(), key=lambda item: (*item[1]["data_offsets"], item[0])):
        begin, end = e["data_offsets"]
        if begin != at:
            what = f"overlaps tensor {previous!r}" if begin < at else f"leaves bytes {at} to {begin} unused"
            raise CheckpointError(f"{path}: corrupt: tensor {key!r} starts at byte {begin} of the data and {what}")
        at, previous = end, key
    if at != data_bytes:
        raise CheckpointError(f"{path}: corrupt: the tensors end at byte {at} of the data, the file holds {data_bytes}")


class TensorSource:
    """All tensors of a checkpoint: a .safetensors file, or a folder (single or sharded).

    `keys()` lists tensor names, `shape(key)` their shapes (PyTorch layout), `read(key)` one
    tensor as a NumPy array in its stored dtype, `where(key)` the file that holds it.
    """

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        self.path = path
        self._files: dict[str, _File] = {}
        self._key_file: dict[str, str] = {}
        for file in self._resolve(path):
            loaded = _File(file)
            self._files[file] = loaded
            for key in loaded.entries:
                if key in self._key_file:
                    raise CheckpointError(f"{file}: tensor {key!r} is also in {self._key_file[key]}")
                self._key_file[key] = file

    @staticmethod
    def _resolve(path: str) -> list[str]:
        if os.path.exists(path) and not os.path.isdir(path):
            return [path]  # a file, or something else _File refuses by name (a FIFO)
        if not os.path.isdir(path):
            raise CheckpointError(f"{path}: no such file or folder")
        indexes = sorted(glob.glob(os.path.join(path, "*.safetensors.index.json")))
        if len(indexes) > 1:
            raise CheckpointError(f"{path}: several index files, cannot tell which to use: {indexes}")
        if indexes:
            check_regular_file(indexes[0], error=CheckpointError)
            with open(indexes[0]) as f:
                weight_map = json.load(f).get("weight_map")
            if not weight_map:
                raise CheckpointError(f"{indexes[0]}: no 'weight_map'")
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not os.path.exists(os.path.join(path, f))]  # _File refuses a FIFO
            if missing:
                raise CheckpointError(f"{indexes[0]}: names shard files that are not in {path}: {missing}")
            return [os.path.join(path, f) for f in files]
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if len(files) != 1:
            found = [os.path.basename(f) for f in files]
            raise CheckpointError(
                f"{path}: expected one .safetensors file or an index json, found {found or 'none'}"
            )
        return files

    def keys(self) -> list[str]:
        return list(self._key_file)

    def __contains__(self, key: str) -> bool:
        return key in self._key_file

    def where(self, key: str) -> str:
        return self._key_file[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._files[self._key_file[key]].entries[key]["shape"])

    def dtype(self, key: str) -> str:
        """The stored dtype name as safetensors spells it ("BF16", "F32", ...)."""
        return self._files[self._key_file[key]].entries[key]["dtype"]

    def nbytes(self, key: str) -> int:
        begin, end = self._files[self._key_file[key]].entries[key]["data_offsets"]
        return end - begin

    def read(self, key: str) -> np.ndarray:
        return self._files[self._key_file[key]].read(key)

    def metadata(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for f in self._files.values():
            merged.update(f.metadata)
        return merged

    def __iter__(self) -> Iterator[str]:
        return iter(self._key_file)

    def __len__(self) -> int:
        return len(self._key_file)
