"""LoRAs fused into the transformer's weights: W + s * alpha/r * B A of every LoRA, on the device
in each kernel's own sharding (an fsdp-sharded kernel is updated shard by shard, never gathered),
or leaf by leaf while a checkpoint streams through (`fluxjax convert --lora`). The adapters are
fluxjax/lora/adapters.py's `Adapters`."""

from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fluxjax.errors import NonFiniteError, UsageError
from fluxjax.lora.adapters import Adapters, check_strengths, with_replacements
from fluxjax.models import quantize


def _fused_kernel(kernel, a, b, scale, strengths):
    """kernel (..., in, out) + a (..., in, R) diag(strengths @ scale) b (..., R, out), in float32."""
    cols = jnp.einsum("n,...nr->...r", strengths, scale)
    delta = jnp.einsum("...ir,...r,...ro->...io", a.astype(jnp.float32), cols, b.astype(jnp.float32))
    return (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)


def _fused_bias(bias, lbias, strengths):
    """bias (..., out) + strengths @ lbias (..., n, out), in float32."""
    return (bias.astype(jnp.float32) + jnp.einsum("n,...no->...o", strengths, lbias)).astype(bias.dtype)


def _fused(kernel, bias, a, b, scale, lbias, strengths):
    """(new kernel, new bias or None) of one Linear."""
    new_bias = None if bias is None else _fused_bias(bias, lbias, strengths)
    return _fused_kernel(kernel, a, b, scale, strengths), new_bias


def _fused_quantized(values, kernel_scale, bias, a, b, scale, lbias, strengths):
    """(values, kernel_scale, new bias or None) of a quantized Linear (fluxjax/models/quantize.py) with the
    update added: dequantized in float32, updated as _fused does, quantized again per output channel
    (an update moves each channel's largest weight, so its scale is recomputed)."""
    kernel, new_bias = _fused(quantize.dequantize(values, kernel_scale, jnp.float32, jnp), bias, a, b, scale, lbias,
                              strengths)
    return (*quantize.quantize_kernel(kernel, quantize.mode_of(values.dtype), jnp), new_bias)


def fuse(params, adapters: Adapters, strengths: Sequence[float]):
    """params with W + s_k * alpha_k/r_k * B_k A_k of every LoRA k folded into its Linears.

    params: the transformer's parameters (blocks stacked, on one device or sharded).
    strengths: one number per LoRA (n,). Each updated kernel is computed on the devices that hold
    it, in its own sharding (jit out_shardings = the kernel's): the low-rank factors are small and
    replicated, so no device ever holds a whole sharded kernel. A quantized kernel (int8 or fp8
    with its kernel_scale) is quantized again with the update in (_fused_quantized). Returns a new tree.
    """
    strengths = _fuse_strengths(adapters, strengths)
    out = with_replacements(params, adapters)

    def walk(node, adapter, prefix):
        for name, sub in adapter.items():
            if "a" in sub and not isinstance(sub["a"], dict):
                kernel, bias = node[name]["kernel"], node[name].get("bias")
                node[name] = dict(node[name])
                args = (bias, sub["a"], sub["b"], sub["scale"], sub["bias"], strengths)
                bias_sharding = None if bias is None else bias.sharding
                if quantize.SCALE in node[name]:
                    old_scale = node[name][quantize.SCALE]
                    fn = jax.jit(_fused_quantized, out_shardings=(kernel.sharding, old_scale.sharding, bias_sharding))
                    node[name]["kernel"], node[name][quantize.SCALE], new_bias = fn(kernel, old_scale, *args)
                    # int8/fp8 values are finite by construction: an overflowing update shows in the scale
                    check_fused_leaf(f"{prefix}{name}/{quantize.SCALE}", node[name][quantize.SCALE], old_scale,
                                     adapters, strengths)
                else:
                    fn = jax.jit(_fused, out_shardings=(kernel.sharding, bias_sharding))
                    node[name]["kernel"], new_bias = fn(kernel, *args)
                    check_fused_leaf(f"{prefix}{name}/kernel", node[name]["kernel"], kernel, adapters, strengths)
                if bias is not None:
                    node[name]["bias"] = new_bias
                    check_fused_leaf(f"{prefix}{name}/bias", new_bias, bias, adapters, strengths)
            else:
                node[name] = dict(node[name])
                walk(node[name], sub, f"{prefix}{name}/")

    out = dict(out)
    walk(out, adapters.tree, "")
    return out


def _fuse_strengths(adapters: Adapters, strengths) -> np.ndarray:
    """One checked strength per LoRA, float32 (n,)."""
    check_strengths(strengths, "fuse strengths")
    strengths = np.asarray(strengths, np.float32).reshape(-1)
    if strengths.shape[0] != adapters.count:
        raise UsageError(f"{adapters.count} LoRAs but {strengths.shape[0]} strengths")
    return strengths


def _all_finite(x) -> bool:
    return bool(np.isfinite(x).all() if isinstance(x, np.ndarray) else jnp.isfinite(x).all())


def check_fused_leaf(path: str, value, before, adapters: Adapters, strengths) -> None:
    """Refuse a fused leaf (`path`, e.g. "double_blocks/img_attn/qkv/kernel") holding NaN or
    infinite values, in one line naming it: the last guard before such weights are used or written
    (`fluxjax convert --lora` writes each leaf only after this; its staging folder, and never DST,
    holds the earlier ones). `before`: the leaf before fusing, read only on failure to say which
    side is at fault."""
    if _all_finite(value):
        return
    if not _all_finite(before):
        raise NonFiniteError(f"{path} holds NaN or infinite values in the model itself, before any LoRA is fused")
    pairs = zip(adapters.names, np.asarray(strengths).reshape(-1))
    loras = ", ".join(f"{os.path.basename(n)}:{float(s):g}" for n, s in pairs)
    raise NonFiniteError(f"fusing {loras} into {path} gave NaN or infinite values (the update overflows this weight); "
                         "lower the strength")


def fuse_leaves(leaves, adapters: Adapters, strengths: Sequence[float]):
    """Fuse while streaming: (Flax path "a/b/kernel", host array) pairs in the stacked layout, as
    fluxjax.loading's Plan.leaves yields them, each kernel and bias updated as `fuse` does."""
    strengths = _fuse_strengths(adapters, strengths)
    replace = {"/".join(leaf): (layer, value) for (leaf, layer), value in adapters.replace.items()}
    for path, value in leaves:
        node = adapters.tree
        for part in path.split("/")[:-1]:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        leaf = path.rsplit("/", 1)[-1]
        before = value
        if "a" in node and leaf == "kernel":
            value = np.asarray(jax.jit(_fused_kernel)(value, node["a"], node["b"], node["scale"], strengths))
        elif "a" in node and leaf == "bias":
            value = np.asarray(jax.jit(_fused_bias)(value, node["bias"], strengths))
        if value is not before:
            check_fused_leaf(path, value, before, adapters, strengths)
        if path in replace:
            layer, new = replace[path]
            value = np.array(value)
            value[layer if layer is not None else slice(None)] = new
        yield path, value
