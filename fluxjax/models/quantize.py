"""Weight-only quantization of the Linear layers: int8 or float8_e4m3fn values with a float32 scale
per output channel (docs/quantization.md has the measured error and memory).

A quantized Linear (models/layers.QuantizedDense) holds
  kernel        (..., in, out)  int8 (or float8_e4m3fn): round(W / s), in [-127, 127] ([-448, 448])
  kernel_scale  (..., out)      float32 s = max|W[:, o]| / 127 (/ 448) over the inputs of channel o
  bias          (..., out)      unchanged
and computes (x @ kernel) * kernel_scale + bias: the scale is per output column, so it multiplies
the product rather than the weight, and the only conversion inside the matmul is the exact one of
int8 (fp8) values to the compute dtype. The scale carries the kernel's output logical axis, so
every sharding strategy splits it as it splits the kernel's columns.

Which Linears are quantized is the model's decision (`quantize` passed to `layers.dense` by the
transformer's blocks and T5's layers); the embedders, the final layer and the norms stay in the
model's dtype. Weights are quantized on the host while the loader streams them
(`quantize_leaves`), so the unquantized weights never reach a device.

Written with numpy/jnp rather than qwix (Google's JAX quantization library, 0.1.8 read 2026-12-05):
qwix quantizes a linen model by intercepting its dot_general calls and replaces each kernel leaf by
a `WithAux(QArray)` node; its `quantize_params` takes device arrays of the whole unquantized tree.
Here the loader streams flat host leaves with logical axes into their shardings, Orbax saves flat
leaves, and live LoRA intercepts nn.Dense: plain int8 + scale leaves fit all three without
another interception layer or a bf16 copy of the model on the device.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Mapping

import jax.numpy as jnp
import numpy as np

from fluxjax.errors import UsageError

# mode -> (stored dtype, the largest magnitude a value takes): int8 symmetric [-127, 127] (so that
# -W quantizes to -round(W)); float8_e4m3fn's largest finite value 448 (it has no infinity).
MODES: dict[str, tuple[np.dtype, float]] = {
    "int8": (np.dtype(jnp.int8), 127.0),
    "fp8": (np.dtype(jnp.float8_e4m3fn), 448.0),
}
SCALE = "kernel_scale"  # the leaf beside a quantized `kernel`


def check_mode(quantize: str | None, what: str = "quantize") -> str | None:
    """`quantize` if it is None or one of MODES; else a one-line UsageError naming `what`."""
    if quantize is not None and quantize not in MODES:
        raise UsageError(f"{what}={quantize!r}: choose int8 or fp8 (weight-only, per output channel), or leave it out")
    return quantize


def mode_of(dtype) -> str:
    """The mode whose stored dtype is `dtype` (a quantized kernel's)."""
    return next(mode for mode, (stored, _) in MODES.items() if stored == np.dtype(dtype))


def quantize_kernel(w, mode: str, xp=np):
    """A kernel (..., in, out) -> (values (..., in, out) in MODES[mode]'s dtype, scale (..., out) float32).

    Per output channel: s = max|W[..., :, o]| / top, values = W / s rounded (to the nearest
    integer for int8, to the nearest float8_e4m3fn for fp8). An all-zero channel gets s = 1.
    xp: numpy (the loader, on the host) or jax.numpy (a LoRA fused into a quantized weight, on
    the device in its sharding).
    """
    dtype, top = MODES[mode]
    w = xp.asarray(w).astype(xp.float32)
    amax = xp.max(xp.abs(w), axis=-2)
    scale = xp.where(amax > 0, amax / xp.float32(top), xp.float32(1.0)).astype(xp.float32)
    v = xp.clip(w / scale[..., None, :], -top, top)
    if mode == "int8":
        v = xp.round(v)
    return v.astype(dtype), scale


def dequantize(values, scale, dtype=np.float32, xp=np):
    """values (..., in, out) * scale (..., out) in `dtype` (the weight a quantized Linear applies)."""
    return (xp.asarray(values).astype(xp.float32) * xp.asarray(scale)[..., None, :]).astype(dtype)


def quantized_kernels(shapes: Mapping) -> set[str]:
    """The flat paths ("a/b/kernel") of the quantized kernels in a flat abstract tree: those with a
    kernel_scale beside them."""
    return {p[: -len(SCALE)] + "kernel" for p in shapes if p.endswith("/" + SCALE)}


def quantize_leaves(leaves: Iterable[tuple[str, np.ndarray]], mode: str, kernels: set[str]) -> Iterator[tuple[str, np.ndarray]]:
    """Stream (flat path, host array) leaves of the unquantized layout, each kernel in `kernels`
    replaced by its values and a `kernel_scale` leaf (quantize_kernel, on the host); others pass."""
    for path, value in leaves:
        if path in kernels:
            values, scale = quantize_kernel(value, mode)
            yield path, values
            yield path[: -len("kernel")] + SCALE, scale
        else:
            yield path, value
