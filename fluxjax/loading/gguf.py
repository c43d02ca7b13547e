"""Read GGUF files (llama.cpp's container, in which city96 publishes FLUX transformers) one tensor
at a time, without the `gguf` package.

The format (ggml docs/gguf.md), all little-endian:
    "GGUF", version u32 (2 or 3), tensor count u64, metadata count u64;
    metadata: key (string), value type u32, value (a scalar, a string = u64 length + UTF-8 bytes,
        or an array = item type u32, count u64, items);
    tensor infos: name (string), n_dims u32, dims u64 x n_dims (dims[0] the fastest-varying,
        so PyTorch's shape is the reverse), GGML type u32, offset u64 into the data section;
    padding to `general.alignment` (default 32), then the data section.
Everything is parsed and checked when the file is opened (magic, version, every type known,
every tensor inside the file), so a bad file fails before a tensor is read. A tensor is then read
with one plain read and dequantized to float32 by fluxjax.loading.ggml (F32, F16 and BF16 come
back as stored); plain reads rather than a memory map for the reason safetensors_io gives: the
host holds one tensor at a time, not every page touched.

`GGUFSource` offers what a `TensorSource` offers (keys, shape, dtype, read, ...), so the key
tables of fluxjax.loading read a GGUF as they read a safetensors file.
"""

from __future__ import annotations

import os
import struct
from typing import Any, Iterator, Sequence

import ml_dtypes
import numpy as np

from fluxjax.errors import CheckpointError
from fluxjax.loading import ggml

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # version 1 had 32-bit counts and is gone from the wild
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
ORIG_SHAPE = "comfy.gguf.orig_shape."  # + tensor name: its shape before ComfyUI-GGUF's convert flattened it

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# What F32/F16/BF16 tensors come back as (their safetensors names, for the key tables' checks).
_FLOATS = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16)}


def is_gguf(path: str) -> bool:
    """Whether `path` is meant as a GGUF file: named .gguf, or starting with GGUF's magic."""
    if path.lower().endswith(".gguf"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


class _Header:
    """Reads the header's fields from an open file, refusing to read past `size`."""

    def __init__(self, f, path: str, size: int):
        self.f, self.path, self.size = f, path, size

    def take(self, n: int) -> bytes:
        if n > self.size - self.f.tell():
            raise CheckpointError(f"{self.path}: truncated: the GGUF header runs past the end of the file "
                                  f"({self.size} bytes)")
        return self.f.read(n)

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.scalar("<Q")).decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.scalar("<I"), self.scalar("<Q")
            if item in _SCALARS:  # one read for the whole array (tokenizer scores run to 100k items)
                dtype = np.dtype(_SCALARS[item])
                return np.frombuffer(self.take(count * dtype.itemsize), dtype).tolist()
            return [self.value(item) for _ in range(count)]
        raise CheckpointError(f"{self.path}: corrupt GGUF header: metadata value type {kind} is not one GGUF defines")


class GGUFSource:
    """The tensors of one GGUF file, read and dequantized one at a time.

    path: the file. architectures: the `general.architecture` values accepted (None: any); a
    file naming another is refused at once (a file without one is judged by its tensors).
    Attributes: metadata (key -> value), architecture (or None), alignment, data_start.
    `ggml_type(key)` names a tensor's stored type; `dtype(key)` is the float type `read` gives.
    """

    def __init__(self, path: str | os.PathLike, architectures: Sequence[str] | None = None):
        path = os.fspath(path)
        self.path = path
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: no such file")
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            magic = f.read(4)
            if magic != MAGIC:
                raise CheckpointError(f"{path}: not a GGUF file (it starts with {magic!r}, a GGUF file with {MAGIC!r})")
            h = _Header(f, path, size)
            version = h.scalar("<I")
            if version not in VERSIONS:
                raise CheckpointError(f"{path}: GGUF version {version}; fluxjax reads versions "
                                      f"{' and '.join(map(str, VERSIONS))}")
            n_tensors, n_kv = h.scalar("<Q"), h.scalar("<Q")
            # Each entry takes at least 8 bytes: a count beyond that is a corrupt header, not a loop to run.
            if 8 * (n_tensors + n_kv) > size:
                raise CheckpointError(f"{path}: truncated or corrupt GGUF header: {n_tensors} tensors and {n_kv} "
                                      f"metadata entries cannot fit in {size} bytes")
            self.metadata: dict[str, Any] = {}
            for _ in range(n_kv):
                key = h.string()
                self.metadata[key] = h.value(h.scalar("<I"))
            infos = []
            for _ in range(n_tensors):
                name, n_dims = h.string(), h.scalar("<I")
                if n_dims > MAX_DIMS:
                    raise CheckpointError(f"{path}: corrupt GGUF header: tensor {name!r} has {n_dims} dims "
                                          f"(GGUF has at most {MAX_DIMS})")
                dims = [h.scalar("<Q") for _ in range(n_dims)]
                infos.append((name, dims, h.scalar("<I"), h.scalar("<Q")))
            header_end = f.tell()
        self.architecture = self.metadata.get("general.architecture")
        if architectures is not None and self.architecture is not None and self.architecture not in architectures:
            raise CheckpointError(f"{path}: a GGUF of a {self.architecture!r} model (general.architecture); "
                                  f"expected {' or '.join(map(repr, architectures))}")
        self.alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(self.alignment, int) or self.alignment <= 0:
            raise CheckpointError(f"{path}: corrupt GGUF header: general.alignment {self.alignment!r}")
        self.data_start = -(-header_end // self.alignment) * self.alignment
        self._tensors: dict[str, tuple[ggml.GGMLType, tuple[int, ...], int, int]] = {}
        for name, dims, type_id, offset in infos:
            self._tensors[name] = self._check(name, dims, type_id, offset, size)

    def _check(self, name: str, dims: list[int], type_id: int, offset: int, size: int):
        """(type, PyTorch shape, first byte, byte count) of one tensor, every check run."""
        path = self.path
        if name in self._tensors:
            raise CheckpointError(f"{path}: corrupt GGUF header: tensor {name!r} is listed twice")
        if type_id not in ggml.TYPES:
            known = ggml.OTHER_TYPES.get(type_id)
            what = f"GGML type {known}" if known else f"unknown GGML type id {type_id}"
            raise CheckpointError(f"{path}: tensor {name!r} has {what}; fluxjax reads "
                                  f"{', '.join(t.name for t in ggml.TYPES.values())}")
        kind = ggml.TYPES[type_id]
        shape = tuple(reversed(dims))
        count = int(np.prod(dims, dtype=np.int64)) if dims else 1
        if dims and dims[0] % kind.block:
            raise CheckpointError(f"{path}: corrupt: tensor {name!r} ({kind.name}, shape {list(shape)}) has rows of "
                                  f"{dims[0]} values, not whole {kind.block}-value blocks")
        if offset % self.alignment:
            raise CheckpointError(f"{path}: corrupt: tensor {name!r} starts at data offset {offset}, "
                                  f"not a multiple of the alignment {self.alignment}")
        orig = self.metadata.get(ORIG_SHAPE + name)
        if orig is not None:
            if not (isinstance(orig, list) and all(isinstance(d, int) and d >= 0 for d in orig)
                    and int(np.prod(orig, dtype=np.int64)) == count):
                raise CheckpointError(f"{path}: metadata {ORIG_SHAPE + name} = {orig!r} is not a shape of "
                                      f"{count} values (tensor {name!r}, shape {list(shape)})")
            shape = tuple(orig)
        begin, nbytes = self.data_start + offset, kind.nbytes(count)
        if begin + nbytes > size:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ({kind.name}, shape {list(shape)}) ends at "
                                  f"byte {begin + nbytes}, the file has {size}")
        return kind, shape, begin, nbytes

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def where(self, key: str) -> str:
        return self.path

    def shape(self, key: str) -> tuple[int, ...]:
        return self._tensors[key][1]

    def ggml_type(self, key: str) -> str:
        return self._tensors[key][0].name

    def dtype(self, key: str) -> str:
        """The dtype `read` gives, spelt as safetensors does: quantized tensors come back as "F32"."""
        name = self.ggml_type(key)
        return name if name in _FLOATS else "F32"

    def nbytes(self, key: str) -> int:
        return self._tensors[key][3]

    def read(self, key: str) -> np.ndarray:
        """One tensor in its PyTorch shape: F32/F16/BF16 as stored, a quantized one dequantized to float32."""
        kind, shape, begin, nbytes = self._tensors[key]
        raw = np.empty(nbytes, np.uint8)
        with open(self.path, "rb") as f:
            f.seek(begin)
            got = f.readinto(raw)
        if got != nbytes:
            raise CheckpointError(f"{self.path}: tensor {key!r} ends after {got} of {nbytes} bytes: the file shrank")
        if kind.name in _FLOATS:
            return raw.view(_FLOATS[kind.name]).reshape(shape)
        return ggml.dequantize(raw, kind).reshape(shape)
