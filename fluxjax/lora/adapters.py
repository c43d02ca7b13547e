"""LoRA adapters on the FLUX transformer: read LoRA files into one stacked `Adapters`, and the
strengths they run at. Fusing them into the weights is fluxjax/lora/fused.py, running them live in
the loop fluxjax/lora/live.py, new ones to train fluxjax/lora/trainable.py.

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
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fluxjax.config import FluxConfig
from fluxjax.errors import UsageError
from fluxjax.lora.formats import STACKS, Piece, Replacement, read_lora_file


@dataclass
class Adapters:
    """n LoRAs on one transformer. tree: {Linear path: {"a", "b", "scale", "bias"}} as nested dicts
    (the layout of params, blocks stacked); replace: {leaf path tuple: array} full
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


def shape_tree(params) -> dict:
    """params -> {path tuple: shape} (works on arrays and ShapeDtypeStructs)."""
    return {tuple(k.key for k in p): tuple(v.shape) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


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
    Returns Adapters whose tree follows the layout of `params` (stacked blocks), leaves in `dtype`
    as host NumPy arrays.
    Raises CheckpointError / UsageError naming the file and key of anything that does not fit.
    """
    shapes = shape_tree(nn.meta.unbox(params))
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
    return Adapters(tree, replace, tuple(p for p, *_ in read), tuple(fmt for _, fmt, *_ in read),
                    width if width != cfg.in_channels else None)


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


def with_replacements(params, adapters: Adapters):
    """params with the adapters' full replacement tensors put in (each in its leaf's sharding)."""
    if not adapters.replace:
        return params
    out = jax.tree.map(lambda x: x, params)  # a new tree of the same arrays
    for (leaf, layer), value in adapters.replace.items():
        node = out
        for part in leaf[:-1]:
            node = node[part]
        old = node[leaf[-1]]
        new = np.asarray(old).copy() if layer is not None else value
        if layer is not None:
            new[layer] = value
        node[leaf[-1]] = jax.device_put(jnp.asarray(new, old.dtype), old.sharding)
    return out


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
