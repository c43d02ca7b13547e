"""fp8 safetensors files (ComfyUI and Kijai single files), their weights read as float32.

Such files store weights as float8_e4m3fn ("F8_E4M3") or float8_e5m2 ("F8_E5M2"), the other
tensors in bf16 or float32. A weight is either the fp8 value itself (a plain cast) or, in
ComfyUI's "scaled fp8" files, the fp8 value times a scalar stored beside it:
    X.weight        fp8
    X.scale_weight  one float: weight = fp8 * scale_weight
    X.scale_input   one float, optional: the scale ComfyUI's fp8 matmul divides the activations
                    by and multiplies the product back with, so the weight-only product is the
                    same without it; dropped
    scaled_fp8      an empty tensor marking the file (its dtype says which fp8); dropped
(ComfyUI comfy/ops.py `scaled_fp8_ops`, comfy/model_detection.py). `dequantized(source)` wraps a
TensorSource holding such tensors so its keys are the weights alone and `read` gives them in
float32, the product rounded once; the key tables then read it as any float file.
"""

from __future__ import annotations

import numpy as np

from fluxjax.errors import CheckpointError
from fluxjax.loading.safetensors_io import TensorSource

FP8 = ("F8_E4M3", "F8_E5M2")
SCALE, INPUT_SCALE = ".scale_weight", ".scale_input"
MARKER = "scaled_fp8"
SCALE_DTYPES = ("F32", "F16", "BF16")


def dequantized(source: TensorSource):
    """`source`, or a view of it reading fp8 weights as float32 when it holds any (or their scales)."""
    keys = source.keys()
    if any(source.dtype(k) in FP8 or k.endswith((SCALE, INPUT_SCALE)) or _is_marker(source, k) for k in keys):
        return Fp8Source(source)
    return source


def _is_marker(source: TensorSource, key: str) -> bool:
    return key.rpartition(".")[2] == MARKER and int(np.prod(source.shape(key))) == 0


class Fp8Source:
    """A TensorSource whose fp8 weights read as float32 (times their scale_weight), the scales and
    the marker hidden. Every scale is checked when it is built, against the header alone."""

    def __init__(self, source: TensorSource):
        self.source, self.path = source, source.path
        self._scales: dict[str, str] = {}  # weight key -> its scale_weight key
        hidden = set()
        for key in source.keys():
            if _is_marker(source, key):
                hidden.add(key)
                continue
            suffix = SCALE if key.endswith(SCALE) else INPUT_SCALE if key.endswith(INPUT_SCALE) else None
            if suffix is None:
                continue
            weight = key[: -len(suffix)] + ".weight"
            where = source.where(key)
            if weight not in source:
                raise CheckpointError(f"{where}: tensor {key!r} scales no weight ({weight!r} is not in the file)")
            if int(np.prod(source.shape(key))) != 1 or source.dtype(key) not in SCALE_DTYPES:
                raise CheckpointError(f"{where}: tensor {key!r} is {source.dtype(key)} of shape "
                                      f"{list(source.shape(key))}; fluxjax reads one float per weight "
                                      f"({', '.join(SCALE_DTYPES)})")
            if suffix == SCALE:
                self._scales[weight] = key
            hidden.add(key)
        self._keys = [k for k in source.keys() if k not in hidden]
        self._key_set = set(self._keys)

    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in self._key_set

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def where(self, key: str) -> str:
        return self.source.where(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.source.shape(key)

    def dtype(self, key: str) -> str:
        """What `read` gives: "F32" for an fp8 or scaled weight, else the stored dtype."""
        return "F32" if key in self._scales or self.source.dtype(key) in FP8 else self.source.dtype(key)

    def nbytes(self, key: str) -> int:
        return self.source.nbytes(key)

    def metadata(self) -> dict[str, str]:
        return self.source.metadata()

    def read(self, key: str) -> np.ndarray:
        value, scale = self.source.read(key), self._scales.get(key)
        if scale is None and self.source.dtype(key) not in FP8:
            return value
        value = value.astype(np.float32)
        if scale is not None:
            value *= np.float32(self.source.read(scale).reshape(()))
        return value
