"""GGML's tensor types, dequantized to float32 with NumPy exactly as GGML defines them.

One function per type turns an array of raw blocks (n_blocks, block bytes) into their values
(n_blocks, block elements), float32, written from the reference C code
(ggml/src/ggml-quants.c `dequantize_row_*`, block layouts in ggml-common.h): the same integer
unpacking and the same float32 operations in the same order, so the values are GGML's bit for
bit (tests/test_quantized_files.py checks each type against the `gguf` package's reference).
Scales are float16 in the file and widen exactly to float32 first.

`dequantize(raw, type_id, count)` is the entry: a tensor's bytes -> its `count` values, block
group by block group so the temporaries stay a few MB whatever the tensor's size.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

QK_K = 256  # elements per K-quant super-block


def _f16(raw: np.ndarray) -> np.ndarray:
    """Little-endian float16 bytes (n, 2) -> float32 (n, 1)."""
    return np.ascontiguousarray(raw).view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Bytes (n, k) -> (n, 2k): the k low nibbles, then the k high ones (GGML's order)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _bits(raw: np.ndarray, count: int) -> np.ndarray:
    """Little-endian bit fields (n, count/8 bytes) -> (n, count) of 0/1: bit j of the field first."""
    return np.unpackbits(raw, axis=1, count=count, bitorder="little")


def _q4_0(b: np.ndarray) -> np.ndarray:  # d f16, qs[16]: y = (q - 8) * d
    d, q = _f16(b[:, :2]), _nibbles(b[:, 2:]).astype(np.int8) - np.int8(8)
    return q.astype(np.float32) * d


def _q4_1(b: np.ndarray) -> np.ndarray:  # d f16, m f16, qs[16]: y = q * d + m
    d, m, q = _f16(b[:, :2]), _f16(b[:, 2:4]), _nibbles(b[:, 4:])
    return q.astype(np.float32) * d + m


def _q5(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """The 5-bit values of Q5_0/Q5_1: element j's fifth bit is bit j of the 32-bit qh."""
    return _nibbles(qs) | (_bits(qh, 32) << 4)


def _q5_0(b: np.ndarray) -> np.ndarray:  # d f16, qh[4], qs[16]: y = (q - 16) * d
    d, q = _f16(b[:, :2]), _q5(b[:, 2:6], b[:, 6:]).astype(np.int8) - np.int8(16)
    return q.astype(np.float32) * d


def _q5_1(b: np.ndarray) -> np.ndarray:  # d f16, m f16, qh[4], qs[16]: y = q * d + m
    d, m, q = _f16(b[:, :2]), _f16(b[:, 2:4]), _q5(b[:, 4:8], b[:, 8:])
    return q.astype(np.float32) * d + m


def _q8_0(b: np.ndarray) -> np.ndarray:  # d f16, qs int8[32]: y = q * d
    q = b[:, 2:].view(np.int8).astype(np.float32)
    q *= _f16(b[:, :2])  # in place: 4x faster here than a new product of the strided quants
    return q


def _crumbs(qs: np.ndarray) -> np.ndarray:
    """2-bit fields of Q2_K/Q3_K: qs (n, 64) -> (n, 256), as GGML walks them: per 128 elements
    32 bytes, read at shifts 0, 2, 4, 6, each shift giving 32 consecutive elements."""
    n = qs.shape[0]
    shifts = np.arange(0, 8, 2, dtype=np.uint8).reshape(1, 1, 4, 1)
    return ((qs.reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, QK_K)


def _q2_k(b: np.ndarray) -> np.ndarray:
    # scales[16] (low nibble scale, high nibble min, one per 16 elements), qs[64], d f16, dmin f16:
    # y = (d * sc) * q - (dmin * m)
    n = b.shape[0]
    scales, d, dmin = b[:, :16], _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = d * (scales & 0x0F).astype(np.float32)
    ml = dmin * (scales >> 4).astype(np.float32)
    q = _crumbs(b[:, 16:80]).reshape(n, 16, 16).astype(np.float32)
    return (dl[:, :, None] * q - ml[:, :, None]).reshape(n, QK_K)


def _q3_k_scales(s: np.ndarray) -> np.ndarray:
    """The 16 6-bit scales of a Q3_K block, from its 12 bytes: low 4 bits from bytes 0-7
    (low nibbles for scales 0-7, high nibbles for 8-15), high 2 bits from bytes 8-11."""
    low = np.concatenate([s[:, :8] & 0x0F, s[:, :8] >> 4], axis=1)
    high = np.concatenate([(s[:, 8:12] >> shift) & 3 for shift in (0, 2, 4, 6)], axis=1)
    return (low | (high << 4)).astype(np.int8) - np.int8(32)


def _q3_k(b: np.ndarray) -> np.ndarray:
    # hmask[32], qs[64], scales[12], d f16: y = (d * (sc - 32)) * (q - (high bit ? 0 : 4)).
    # The high bit of element 32k + l is bit k of hmask[l] (GGML steps one mask over all 8 runs).
    n = b.shape[0]
    hmask, d = b[:, :32], _f16(b[:, 108:110])
    dl = d * _q3_k_scales(b[:, 96:108]).astype(np.float32)
    high = ((hmask.reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1).reshape(n, QK_K)
    q = _crumbs(b[:, 32:96]).astype(np.int8) - ((high ^ 1) << 2).astype(np.int8)
    return (dl[:, :, None] * q.reshape(n, 16, 16).astype(np.float32)).reshape(n, QK_K)


def _k4_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 6-bit (scale, min) pairs of a Q4_K/Q5_K block from its 12 bytes (GGML's
    get_scale_min_k4): pairs 0-3 in the low 6 bits of bytes 0-3 / 4-7; pairs 4-7 take their low
    4 bits from the nibbles of bytes 8-11 and their top 2 bits from bytes 0-3 / 4-7."""
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc, m


def _k_affine(b: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: d f16, dmin f16, scales[12] first; y = (d * sc) * q - (dmin * m) per 32 elements."""
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, m = _k4_scales(b[:, 4:16])
    d1, m1 = d * sc.astype(np.float32), dmin * m.astype(np.float32)
    return (d1[:, :, None] * q.reshape(n, 8, 32).astype(np.float32) - m1[:, :, None]).reshape(n, QK_K)


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """qs (n, 128) -> (n, 256): per 32 bytes the 32 low nibbles, then the 32 high ones."""
    n = qs.shape[0]
    q = qs.reshape(n, 4, 1, 32)
    return np.concatenate([q & 0x0F, q >> 4], axis=2).reshape(n, QK_K)


def _q4_k(b: np.ndarray) -> np.ndarray:  # d, dmin, scales[12], qs[128]
    return _k_affine(b, _k_nibbles(b[:, 16:]))


def _q5_k(b: np.ndarray) -> np.ndarray:
    # d, dmin, scales[12], qh[32], qs[128]: element 32k + l gets its fifth bit from bit k of qh[l]
    n = b.shape[0]
    high = (b[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
    return _k_affine(b, _k_nibbles(b[:, 48:]) | (high.reshape(n, QK_K) << 4))


def _q6_k(b: np.ndarray) -> np.ndarray:
    # ql[128], qh[64], scales int8[16], d f16: y = (d * sc) * (q - 32) per 16 elements. Each half
    # (128 elements) reads 64 ql bytes and 32 qh bytes; its run k (32 elements) takes the low
    # (k = 0, 1) or high (k = 2, 3) nibbles of ql[32 (k % 2) + l] and bits 2k, 2k+1 of qh[l].
    n = b.shape[0]
    ql = b[:, :128].reshape(n, 2, 2, 32)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)  # (n, half, k, l)
    qh = b[:, 128:192].reshape(n, 2, 1, 32) >> np.arange(0, 8, 2, dtype=np.uint8).reshape(1, 1, 4, 1)
    q = (low | ((qh & 3) << 4)).astype(np.int8) - np.int8(32)
    dl = _f16(b[:, 208:210]) * b[:, 192:208].view(np.int8).astype(np.float32)
    return (dl[:, :, None] * q.reshape(n, 16, 16).astype(np.float32)).reshape(n, QK_K)


def _bf16(b: np.ndarray) -> np.ndarray:  # the top half of a float32
    return (np.ascontiguousarray(b).view("<u2").astype(np.uint32) << 16).view(np.float32)


@dataclasses.dataclass(frozen=True)
class GGMLType:
    """One GGML tensor type: its id in the file, name, block (elements, bytes) and dequantizer."""

    id: int
    name: str
    block: int
    block_bytes: int
    decode: Callable[[np.ndarray], np.ndarray]

    def nbytes(self, count: int) -> int:
        return count // self.block * self.block_bytes


# The types fluxjax reads: every one city96 publishes FLUX transformers in (ggml.h `ggml_type`).
TYPES: dict[int, GGMLType] = {t.id: t for t in (
    GGMLType(0, "F32", 1, 4, lambda b: np.ascontiguousarray(b).view("<f4").astype(np.float32)),
    GGMLType(1, "F16", 1, 2, _f16),
    GGMLType(30, "BF16", 1, 2, _bf16),
    GGMLType(2, "Q4_0", 32, 18, _q4_0),
    GGMLType(3, "Q4_1", 32, 20, _q4_1),
    GGMLType(6, "Q5_0", 32, 22, _q5_0),
    GGMLType(7, "Q5_1", 32, 24, _q5_1),
    GGMLType(8, "Q8_0", 32, 34, _q8_0),
    GGMLType(10, "Q2_K", QK_K, 84, _q2_k),
    GGMLType(11, "Q3_K", QK_K, 110, _q3_k),
    GGMLType(12, "Q4_K", QK_K, 144, _q4_k),
    GGMLType(13, "Q5_K", QK_K, 176, _q5_k),
    GGMLType(14, "Q6_K", QK_K, 210, _q6_k),
)}
# Types GGML has that fluxjax does not read, named in errors (ggml.h; 4, 5 are retired ids).
OTHER_TYPES = {9: "Q8_1", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL",
               21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
               29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4"}

CHUNK = 1 << 20  # elements dequantized at a time: 4 MB of float32, a few times that in temporaries


def dequantize(raw: np.ndarray, ggml_type: GGMLType) -> np.ndarray:
    """The bytes `raw` (uint8, whole blocks) of a tensor of `ggml_type` -> its values as a float32
    vector, CHUNK elements at a time."""
    blocks = raw.reshape(-1, ggml_type.block_bytes)
    out = np.empty(blocks.shape[0] * ggml_type.block, np.float32)
    values = out.reshape(-1, ggml_type.block)
    step = max(1, CHUNK // ggml_type.block)
    for start in range(0, blocks.shape[0], step):
        values[start:start + step] = ggml_type.decode(blocks[start:start + step])
    return out
