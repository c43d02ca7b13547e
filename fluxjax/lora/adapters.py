"""LoRA adapters on the FLUX transformer: read, fuse into the weights, or run live in the loop.

`load_loras(files, config, params)` reads LoRA files (any format of fluxjax.lora.formats) into
one `Adapters`: a parameter-shaped tree on fluxjax's own layout, for n LoRAs at once. For each
adapted Linear (path as in params, e.g. `double_blocks/img_attn/qkv`, block axis first when the
blocks are stacked: block 7's adapter is at index 7, as its kernel is):
  a      (in, R)      every LoRA's down matrices side by side (R = the sum of their ranks)
  b      (R, out)     their up matrices, each on the output rows it updates (zero elsewhere:
                      diffusers' separate to_q/to_k/to_v land on their thirds of the fused qkv)
  scale  (n, R)       alpha/rank of LoRA k on its own rank columns (rsLoRA: alpha/sqrt(rank)), 0 on the others
  bias   (n, out)     LoRA k's lora_B.bias times its scale (BFL control LoRAs, PEFT's lora_bias), usually zeros
so that with per-LoRA strengths s (n,), the update of that Linear is
  kernel + a @ diag(s @ scale) @ b,  bias + s @ bias    (W + s * alpha/r * B A, b + s * alpha/r * b_B, stacked:
                                                         PEFT's lora_B(lora_A(x)) * scaling).
Full replacement tensors (control LoRAs' QK-norm scales) are in `Adapters.replace`.
A structural-control LoRA (FLUX.1-Canny/Depth-dev-lora) also widens img_in to 128 inputs (x and
the control image's latents); `load_loras(..., widen=True)` accepts it (`Adapters.input_width`)
and `widen_input` gives the base weights the new inputs at zero, as diffusers' loader does.

Fused: `fuse(params, adapters, strengths)` computes the update on the device in the kernel's
own sharding (an fsdp-sharded kernel is updated shard by shard, never gathered).
Live: `variables(params, adapters)` + `live(scales)` around `model.apply` add the low-rank
branch x @ a * (scales @ scale) @ b inside the jitted loop; the adapters and `scales` (B, n),
a strength per image and LoRA, are jit arguments, so new LoRAs of the same ranks, or new
strengths, do not recompile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fluxjax.models import quantize
from fluxjax.config import FluxConfig
from fluxjax.errors import NonFiniteError, UsageError
from fluxjax.lora.formats import STACKS, Piece, Replacement, read_lora_file
from fluxjax.models.layers import unstack_layers

COLLECTION = "lora"  # the variable collection the live branch reads; scanned with the blocks


@dataclass
class Adapters:
    """n LoRAs on one transformer. tree: {Linear path: {"a", "b", "scale", "bias"}} as nested dicts
    (the layout of params: stacked or per-block); replace: {leaf path tuple: array} full
    replacement tensors; names: the files; formats: each file's format."""

    tree: dict
    replace: dict = field(default_factory=dict)
    names: tuple[str, ...] = ()
    formats: tuple[str, ...] = ()
    input_width: int | None = None  # img_in's input features a control LoRA needs, when wider than the model's

    @property
    def count(self) -> int:
        return len(self.names)


# The largest |strength| taken. Strengths in use lie within about +-2 (rarely 10): the update grows
# linearly with it, so at 1e4 it is 1e4 times the LoRA's own and the image is noise long before;
# beyond, products overflow (1e38 is finite in float32, its product with alpha/r is not). A bound
# refuses such a strength in one line before anything loads, not with NaN images after the run.
MAX_STRENGTH = 1e4


def check_strengths(values, what: str) -> None:
    """Refuse LoRA strengths that are NaN, infinite or beyond +-MAX_STRENGTH: a one-line UsageError
    naming `what` (the argument) and the first bad value. Fused, such a strength writes NaN or
    overflowed weights; live, every pixel comes out NaN."""
    s = np.asarray(values, np.float64).reshape(-1)
    bad = s[~(np.abs(s) <= MAX_STRENGTH)]
    if bad.size:
        why = "is not a finite number" if not np.isfinite(bad[0]) else f"is beyond +-{MAX_STRENGTH:g}"
        raise UsageError(f"{what}: the LoRA strength {bad[0]:g} {why} (strengths in use lie within about +-2)")


def parse_lora_arg(text: str, what: str = "--lora") -> tuple[str, float]:
    """"FILE[:SCALE]" (the CLI's --lora) -> (file, scale); a missing scale is 1.0.
    what: how errors name the argument (the CLI's "--lora", a batch line's "loras" item)."""
    path, sep, scale = text.rpartition(":")
    if not sep or os.path.exists(text):
        return text, 1.0
    try:
        value = float(scale)
    except ValueError:
        raise UsageError(f"{what} {text!r}: expected FILE or FILE:SCALE with a number as SCALE") from None
    check_strengths(value, f"{what} {text!r}")
    return path, value


def _shape_tree(params) -> dict:
    """params -> {path tuple: shape} (works on arrays and ShapeDtypeStructs)."""
    return {tuple(k.key for k in p): tuple(v.shape) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def _stacked_shapes(params, cfg: FluxConfig) -> dict:
    """Shapes in the stacked layout, also when `params` holds per-block entries (double_blocks_0, ...)."""
    shapes = _shape_tree(params)
    out = {}
    for path, shape in shapes.items():
        head = path[0]
        stack = head.rsplit("_", 1)[0] if head.rsplit("_", 1)[-1].isdigit() else None
        if stack in STACKS:
            out[(stack,) + path[1:]] = (getattr(cfg, STACKS[stack]),) + shape
        else:
            out[path] = shape
    return out


def _check_piece(path: str, piece: Piece, kernel: tuple) -> None:
    in_dim, out_dim = kernel[-2:]
    rows = out_dim if piece.rows is None else len(piece.rows)
    if piece.target == "img_in" and piece.down.shape[1] != in_dim:
        raise UsageError(f"{path}: key {piece.key!r} widens img_in to {piece.down.shape[1]} input channels, the model "
                         f"has {in_dim}: a structural-control LoRA (FLUX.1 Canny/Depth), which only a base model "
                         "takes, through FluxPipeline.load_lora (it widens the model for the control image)")
    if piece.down.shape[1] != in_dim or piece.up.shape[0] != rows:
        raise UsageError(f"{path}: key {piece.key!r} updates a {rows}x{piece.down.shape[1]} weight, the model's "
                         f"{piece.target} needs {rows}x{in_dim} (a LoRA for another FLUX size or variant?)")


def load_loras(files: Sequence[str | os.PathLike], cfg: FluxConfig, params, dtype=jnp.float32,
               widen: bool = False) -> Adapters:
    """Read LoRA files for the transformer (`cfg`, its `params` or their shapes) into one Adapters.

    files: paths of LoRA .safetensors files, any format of fluxjax.lora.formats.
    widen: accept LoRAs whose img_in pair has more inputs than the model (structural control);
        their adapters are then built for that width, recorded as `input_width`, and the params
        must be widened with `widen_input` before they are fused or run live. Otherwise refused.
    Returns Adapters whose tree follows the layout of `params` (stacked blocks, or the per-block
    entries of layer_loop="unrolled"), leaves in `dtype` as host NumPy arrays.
    Raises CheckpointError / UsageError naming the file and key of anything that does not fit.
    """
    shapes = _stacked_shapes(nn.meta.unbox(params), cfg)
    read = []
    for f in files:
        path = os.fspath(f)
        fmt, pieces, replacements = read_lora_file(path, cfg)
        read.append((path, fmt, pieces, replacements))
    n = len(read)
    grouped: dict[str, list[tuple[int, Piece]]] = {}
    for k, (path, _, pieces, _) in enumerate(read):
        for piece in pieces:
            kernel = shapes.get(tuple(piece.target.split("/")) + ("kernel",))
            if kernel is None:
                raise UsageError(f"{path}: key {piece.key!r} targets {piece.target}, which this model does not have")
            if widen and piece.target == "img_in" and piece.down.shape[1] > kernel[0]:
                shapes[("img_in", "kernel")] = kernel = (piece.down.shape[1], kernel[1])
            _check_piece(path, piece, kernel)
            grouped.setdefault(piece.target, []).append((k, piece))

    tree: dict = {}
    for target, items in grouped.items():
        kernel = shapes[tuple(target.split("/")) + ("kernel",)]
        leaves = _module_adapter(items, kernel, n, stacked=target.split("/")[0] in STACKS)
        node = tree
        for part in target.split("/"):
            node = node.setdefault(part, {})
        node.update({k: v.astype(dtype) for k, v in leaves.items()})
    replace = {}
    for path, _, _, replacements in read:
        for r in replacements:
            _add_replacement(replace, r, shapes, path)
    width = shapes[("img_in", "kernel")][0]
    stacked = Adapters(tree, replace, tuple(p for p, *_ in read), tuple(fmt for _, fmt, *_ in read),
                       width if width != cfg.in_channels else None)
    return _like(stacked, params)


def widen_input(params, width: int):
    """params with img_in taking `width` input features: the new inputs' weights zero, so the
    model's output is unchanged until a LoRA moves them (diffusers' control-LoRA expansion of
    x_embedder). Kept in the kernel's sharding."""
    kernel = params["img_in"]["kernel"]
    if width < kernel.shape[0]:
        raise UsageError(f"img_in has {kernel.shape[0]} inputs; cannot narrow it to {width}")
    wide = np.zeros((width, kernel.shape[1]), kernel.dtype)
    wide[: kernel.shape[0]] = np.asarray(kernel)
    out = dict(params)
    out["img_in"] = dict(params["img_in"], kernel=jax.device_put(wide, kernel.sharding))
    return out


def _module_adapter(items: list[tuple[int, Piece]], kernel: tuple, n: int, stacked: bool) -> dict:
    """The a/b/scale/bias leaves of one Linear from the pieces of n LoRAs that update it."""
    layers = kernel[0] if stacked else 1
    in_dim, out_dim = kernel[-2:]
    # Each piece gets its own rank columns; the pieces of one LoRA playing the same part (same
    # output rows and rank) in different blocks share them, and a block a piece does not touch
    # keeps zeros there.
    slots: list[tuple[tuple, set]] = []  # ((lora, first row, rows, rank), layers using it)
    starts = []
    for k, p in items:
        role = (k, -1 if p.rows is None else int(p.rows[0]), -1 if p.rows is None else len(p.rows), p.down.shape[0])
        free = [j for j, (r, used) in enumerate(slots) if r == role and p.layer not in used]
        if not free:
            slots.append((role, set()))
            free = [len(slots) - 1]
        slots[free[0]][1].add(p.layer)
        starts.append(sum(r[3] for r, _ in slots[: free[0]]))
    rank = sum(r[3] for r, _ in slots)
    a = np.zeros((layers, in_dim, rank), np.float32)
    b = np.zeros((layers, rank, out_dim), np.float32)
    scale = np.zeros((layers, n, rank), np.float32)
    bias = np.zeros((layers, n, out_dim), np.float32)
    for (k, p), start in zip(items, starts):
        i = p.layer or 0
        r = p.down.shape[0]
        cols = slice(start, start + r)
        rows = np.arange(out_dim) if p.rows is None else p.rows
        a[i, :, cols] += p.down.T
        b[i][cols][:, rows] += p.up.T  # (rank, rows): a view, so the update lands in b
        scale[i, k, cols] = p.scale
        if p.bias is not None:  # B's bias is part of lora_B, so it takes the same scale (PEFT)
            bias[i, k, rows] += p.scale * p.bias
    leaves = dict(a=a, b=b, scale=scale, bias=bias)
    return leaves if stacked else {k: v[0] for k, v in leaves.items()}


def _add_replacement(replace: dict, r: Replacement, shapes: dict, path: str) -> None:
    leaf = tuple(r.leaf.split("/"))
    shape = shapes.get(leaf)
    if shape is None or shape[-r.value.ndim:] != r.value.shape:
        raise UsageError(f"{path}: key {r.key!r} of shape {r.value.shape} replaces no parameter of this model "
                         f"({r.leaf} is {shape})")
    replace[(leaf, r.layer)] = r.value


def _like(adapters: Adapters, params) -> Adapters:
    """Adapters in the layout of `params`: per-block entries when params has them."""
    heads = set(params)
    unrolled = [s for s in STACKS if s in adapters.tree and s not in heads]
    if not unrolled:
        return adapters
    tree = unstack_layers(jax.tree.map(jnp.asarray, adapters.tree), unrolled)
    return dataclasses.replace(adapters, tree=jax.tree.map(np.asarray, tree))


def with_replacements(params, adapters: Adapters):
    """params with the adapters' full replacement tensors put in (each in its leaf's sharding)."""
    if not adapters.replace:
        return params
    out = jax.tree.map(lambda x: x, params)  # a new tree of the same arrays
    for (leaf, layer), value in adapters.replace.items():
        if leaf[0] in out:
            node = out
            for part in leaf[:-1]:
                node = node[part]
            old = node[leaf[-1]]
            new = np.asarray(old).copy() if layer is not None else value
            if layer is not None:
                new[layer] = value
            node[leaf[-1]] = jax.device_put(jnp.asarray(new, old.dtype), old.sharding)
        else:  # per-block layout
            node = out[f"{leaf[0]}_{layer}"]
            for part in leaf[1:-1]:
                node = node[part]
            old = node[leaf[-1]]
            node[leaf[-1]] = jax.device_put(jnp.asarray(value, old.dtype), old.sharding)
    return out


# --- fused --------------------------------------------------------------------------------------


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

    params: the transformer's parameters (stacked or per-block, on one device or sharded).
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


# --- live ---------------------------------------------------------------------------------------

_SCALES: list = [None]  # the per-image strengths of the `live` context being traced


def variables(params, adapters: Adapters | dict | None) -> dict:
    """The `model.apply` variables: params plus, when given, the adapters' tree as the lora collection."""
    if adapters is None:
        return {"params": params}
    tree = adapters.tree if isinstance(adapters, Adapters) else adapters
    return {"params": params, COLLECTION: tree}


def _low_rank_branch(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, nn.Dense) or not module.has_variable(COLLECTION, "a"):
        return out
    scales = _SCALES[0]
    if scales is None:
        raise RuntimeError("LoRA adapters passed to the model outside a lora.live(scales) context")
    x = args[0]
    a, b, scale, bias = (module.get_variable(COLLECTION, k) for k in ("a", "b", "scale", "bias"))
    # x (B, ..., in): every Linear of FLUX sees the batch first, so per-image strengths broadcast.
    cols = (scales @ scale.astype(jnp.float32)).astype(x.dtype)       # (B, R)
    shape = (x.shape[0],) + (1,) * (x.ndim - 2)
    h = (x @ a.astype(x.dtype)) * cols.reshape(shape + cols.shape[-1:])
    shift = (scales @ bias.astype(jnp.float32)).astype(out.dtype)     # (B, out)
    return out + (h @ b.astype(x.dtype)).astype(out.dtype) + shift.reshape(shape + shift.shape[-1:])


@contextlib.contextmanager
def live(scales):
    """Within this context (while tracing `model.apply(lora.variables(params, adapters), ...)`),
    every Linear with an adapter adds x @ a * (scales @ scale) @ b + scales @ bias.

    scales: (B, n) float32, the strength of LoRA k on image b (a jit argument: no recompile when
    it changes). A no-op for Linears without adapters.
    """
    previous, _SCALES[0] = _SCALES[0], jnp.asarray(scales, jnp.float32)
    try:
        with nn.intercept_methods(_low_rank_branch):
            yield
    finally:
        _SCALES[0] = previous


def image_scales(strengths, batch: int, count: int) -> np.ndarray:
    """Per-image strengths (B, n) from one number per LoRA (n,) or per image and LoRA (B, n)."""
    check_strengths(strengths, "lora_scales")
    s = np.asarray(strengths, np.float32)
    if s.ndim == 1:
        s = np.broadcast_to(s, (batch, s.shape[0]))
    if s.shape != (batch, count):
        raise UsageError(f"lora_scales must be {count} numbers or a {batch}x{count} table (one row per image), "
                         f"got shape {s.shape}")
    return np.ascontiguousarray(s)


# --- training -----------------------------------------------------------------------------------

# The Linears a new LoRA adapts unless told otherwise: attention qkv/proj and the MLP of every block
# (the single block's linear1 is its qkv and MLP input together, linear2 its proj and MLP output).
DEFAULT_TRAIN_TARGETS = tuple(f"double_blocks/{s}_{m}" for s in ("img", "txt") for m in ("attn/qkv", "attn/proj", "mlp/0", "mlp/2")) + (
    "single_blocks/linear1", "single_blocks/linear2")
FACTORS = ("a", "b")  # the leaves of an adapter that train; scale and bias stay fixed


def new_adapters(params, cfg: FluxConfig, rank: int, alpha: float | None = None,
                 targets: Sequence[str] = DEFAULT_TRAIN_TARGETS, seed: int = 0) -> Adapters:
    """One fresh LoRA of `rank` on the Linears `targets` (Flax paths in the stacked layout), to train.

    params: the transformer's parameters or their shapes, stacked blocks (layer_loop="scan").
    alpha: the LoRA's alpha (default: rank, a scale of 1). Initialised as PEFT does: a uniform in
    +-1/sqrt(in) (kaiming-uniform with a=sqrt(5)), b zeros, so the model starts unchanged.
    Returns Adapters with n = 1: a (layers, in, rank), b (layers, rank, out) float32, scale
    (layers, 1, rank) = alpha / rank, bias (layers, 1, out) zeros; host NumPy arrays.
    """
    if rank < 1:
        raise UsageError(f"LoRA rank must be at least 1, got {rank}")
    alpha = float(rank if alpha is None else alpha)
    shapes = _shape_tree(nn.meta.unbox(params))
    rng = np.random.default_rng(seed)
    tree: dict = {}
    for target in targets:
        kernel = shapes.get(tuple(target.split("/")) + ("kernel",))
        if kernel is None or not (len(kernel) == 2 or target.split("/")[0] in STACKS):
            raise UsageError(f"LoRA target {target!r} is no Linear of this model (stacked layout), e.g. {DEFAULT_TRAIN_TARGETS[0]!r}")
        *lead, in_dim, out_dim = kernel
        bound = 1.0 / np.sqrt(in_dim)
        node = tree
        for part in target.split("/"):
            node = node.setdefault(part, {})
        node.update(a=rng.uniform(-bound, bound, (*lead, in_dim, rank)).astype(np.float32),
                    b=np.zeros((*lead, rank, out_dim), np.float32),
                    scale=np.full((*lead, 1, rank), alpha / rank, np.float32),
                    bias=np.zeros((*lead, 1, out_dim), np.float32))
    return Adapters(tree, names=("trained",), formats=("fluxjax",))


def split_factors(tree: dict) -> tuple[dict, dict]:
    """An adapter tree -> (its a/b factors, the rest: scale and bias), two trees of the same paths."""
    if "a" in tree and not isinstance(tree["a"], dict):
        return {k: tree[k] for k in FACTORS}, {k: v for k, v in tree.items() if k not in FACTORS}
    pairs = {name: split_factors(sub) for name, sub in tree.items()}
    return {k: v[0] for k, v in pairs.items()}, {k: v[1] for k, v in pairs.items()}


def join_factors(factors: dict, fixed: dict) -> dict:
    """The inverse of `split_factors`."""
    if "a" in factors and not isinstance(factors["a"], dict):
        return {**factors, **fixed}
    return {name: join_factors(sub, fixed[name]) for name, sub in factors.items()}


def _adapter_nodes(tree: dict, prefix: str = ""):
    """(Flax path, adapter leaves) of every adapted Linear in an adapter tree."""
    for name, sub in tree.items():
        path = f"{prefix}{name}"
        if "a" in sub and not isinstance(sub["a"], dict):
            yield path, sub
        else:
            yield from _adapter_nodes(sub, path + "/")


def save_diffusers(path: str | os.PathLike, tree: dict, cfg: FluxConfig) -> None:
    """Write one LoRA (an adapter tree with n = 1, stacked layout, e.g. a trained `new_adapters`)
    as diffusers writes a FLUX transformer LoRA: `transformer.<diffusers module>.lora_A.weight`
    (rank, in) and `.lora_B.weight` (out, rank) in float32, and PEFT's LoraConfig (r, lora_alpha,
    target_modules) as the `lora_adapter_metadata` JSON with the "transformer." prefix.

    A fused Linear diffusers splits (qkv -> to_q/to_k/to_v; a single block's linear1 -> those and
    proj_mlp) gets the same lora_A on each part and the rows of lora_B that land on it: the same
    update W + alpha/r B A. Every Linear must share one rank and alpha (PEFT's r and lora_alpha).
    """
    from safetensors.numpy import save_file

    from fluxjax.lora.formats import diffusers_linears

    nodes = {p: {k: np.asarray(v, np.float32) for k, v in leaves.items()} for p, leaves in _adapter_nodes(tree)}
    ranks = {leaves["a"].shape[-1] for leaves in nodes.values()}
    scales = {float(s) for leaves in nodes.values() for s in np.unique(leaves["scale"])}
    if len(ranks) != 1 or len(scales) != 1 or any(np.any(leaves["bias"]) for leaves in nodes.values()):
        raise UsageError(f"{os.fspath(path)}: a diffusers LoRA file needs one rank and one alpha on every Linear and no "
                         f"bias; these adapters have ranks {sorted(ranks)} and scales {sorted(scales)}")
    rank, = ranks
    alpha = scales.pop() * rank
    tensors, modules = {}, []
    for module, (target, layer, rows) in diffusers_linears(cfg).items():
        if target not in nodes:
            continue
        leaves = nodes[target]
        a, b = (leaves[k] if layer is None else leaves[k][layer] for k in FACTORS)
        tensors[f"transformer.{module}.lora_A.weight"] = np.ascontiguousarray(a.T)
        tensors[f"transformer.{module}.lora_B.weight"] = np.ascontiguousarray((b if rows is None else b[:, rows]).T)
        modules.append(module)
    config = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(modules), "lora_dropout": 0.0, "bias": "none",
              "use_dora": False, "init_lora_weights": True}
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()},
                                                                    indent=2, sort_keys=True)}
    save_file(tensors, os.fspath(path), metadata=metadata)
