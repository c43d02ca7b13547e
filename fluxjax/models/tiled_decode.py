"""The VAE decode in tiles, equal to the whole decode: for images of 2048 pixels and more on a side.

Why not diffusers' tiles (`AutoencoderKL.tiled_decode`: overlapping latent tiles decoded on their
own, blended with linear ramps): the FLUX decoder is not local. Its mid block attends over every
latent position and each of its 25 GroupNorms after it normalises with statistics of the whole
image, so a tile decoded on its own is normalised otherwise than the whole decode, whatever the
overlap (a tile of flat sky unlike the image around it). Measured (2026-12-05) on a random decoder
at the real depth and 1/8 of the width, 768x768, 3x3 tiles of 256 pixels with 128 of margin (more
than the 98-pixel reach of the convolutions after the mid block): max error 4.9e-2 (max |pixel| 3.9)
with each tile's own statistics, 6.8e-3 and 2.3e-3 with statistics gathered over all tiles' cores
once and three times.

What this does instead, exactly:
1. The global part runs once on the whole latent: post_quant_conv, decoder.conv_in and decoder.mid
   (attention included), at latent resolution, 1/64 of the pixels.
2. The rest runs as sweeps, each one 3x3 convolution deep, over tiles of the activation it reads,
   the whole activation between sweeps held once: a ResnetBlock is two sweeps (norm1, swish,
   conv1; then norm2, swish, conv2 and the shortcut), an Upsample one, norm_out with conv_out one.
   Before each sweep that normalises, the GroupNorm statistics are taken from the whole held
   activation, so every tile is normalised as the whole decode normalises it; with a halo of one
   pixel around each tile its convolution sees what the whole decode sees, so the tiles' cores,
   put side by side, are the whole decode (no blending: cores do not overlap).
The sweeps run the decoder's own modules (ResnetBlock, Upsample, GroupNorm) on the tiles, with
`nn.intercept_methods` handing a GroupNorm the whole activation's statistics and a block its held
intermediate.

Memory: the sweeps hold a block's input, its intermediate and its output whole, and one tile's
temporaries. XLA:CPU does not make this smaller than the whole decode (2026-12-05, FLUX VAE,
float32, 2048x2048, compiled temporaries from memory_analysis): whole 15.0 GB, tiled 30.6 GB with
this fori_loop per sweep (the loops' operands are copied), 18.4 GB with the tiles unrolled
(tile 512). XLA:CPU already runs a whole ResnetBlock with one temporary activation (2.1 GB at
2048x2048x128), so the sweeps have nothing to save there. Hence the pipeline decodes in tiles
only when asked (`decode_packed(..., tiled=True)`); accelerators are not measured yet.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fluxjax.models.autoencoder import AutoEncoder, GroupNorm, MidBlock, ResnetBlock, Upsample, conv
from fluxjax.models.layers import matmul_precision

TILE = 256  # pixels of the activation a sweep reads, per side of a tile's core


class _Stop(Exception):
    """Raised once a captured value is in hand, so nothing after it is traced."""


def _capture(model: AutoEncoder, params, z: jax.Array) -> jax.Array:
    """Normalised latents (B, h, w, z_channels) -> the decoder's mid-block output (B, h, w, C)."""
    captured = {}

    def stop_after_mid(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, MidBlock) and context.method_name == "__call__":
            captured["mid"] = out
            raise _Stop
        return out

    try:
        with nn.intercept_methods(stop_after_mid):
            model.apply({"params": params}, z, method="decode")
    except _Stop:
        return captured["mid"]
    raise AssertionError("the decoder ran without its mid block")  # AutoEncoder.decode always runs it


def group_stats(x: jax.Array, groups: int) -> tuple[jax.Array, jax.Array]:
    """Mean and (two-pass) variance, each (B, groups) float32, of x (B, H, W, C) per contiguous
    channel group: the statistics GroupNorm takes over the whole of x."""
    b, h, w, c = x.shape
    xf = x.astype(jnp.float32).reshape(b, h, w, groups, c // groups)
    mean = xf.mean((1, 2, 4))
    return mean, jnp.square(xf - mean[:, None, None, :, None]).mean((1, 2, 4))


def _tiles(size: int, tile: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Tiles along one axis: core starts (n,) (the last moved back so every core is `tile` long),
    window starts (n,) (one pixel of halo where the axis goes on), the core and window lengths."""
    tile = min(tile, size)
    window = min(size, tile + 2)
    cores = np.array(sorted({min(s, size - tile) for s in range(0, size, tile)}), np.int32)
    return cores, np.clip(cores - 1, 0, size - window).astype(np.int32), tile, window


def sweep(fn: Callable[..., jax.Array], inputs: tuple[jax.Array, ...], tile: int, scale: int = 1) -> jax.Array:
    """fn, local to one pixel around each output pixel (one 3x3 conv deep), applied in tiles.

    inputs: arrays (B, H, W, C_k) of one spatial size; fn(*windows) -> (B, scale*h, scale*w, C') for
    windows (B, h, w, C_k). Returns fn(*inputs) (B, scale*H, scale*W, C') in fn's dtype, computed
    one tile at a time in a lax.fori_loop (one window shape: the body compiles once).
    """
    b, hh, ww, _ = inputs[0].shape
    rc, rw, rt, rwin = _tiles(hh, tile)
    cc, cw, ct, cwin = _tiles(ww, tile)
    grid = np.array([(rc[i], rw[i], cc[j], cw[j]) for i in range(len(rc)) for j in range(len(cc))], np.int32)
    out_shape = jax.eval_shape(fn, *(jax.ShapeDtypeStruct((b, rwin, cwin, x.shape[-1]), x.dtype) for x in inputs))
    table = jnp.asarray(grid)

    def body(t, out):
        r0, r_win, c0, c_win = table[t]
        windows = [jax.lax.dynamic_slice(x, (0, r_win, c_win, 0), (b, rwin, cwin, x.shape[-1])) for x in inputs]
        y = fn(*windows)
        core = jax.lax.dynamic_slice(y, (0, (r0 - r_win) * scale, (c0 - c_win) * scale, 0),
                                     (b, rt * scale, ct * scale, y.shape[-1]))
        return jax.lax.dynamic_update_slice(out, core, (0, r0 * scale, c0 * scale, 0))

    out = jnp.zeros((b, hh * scale, ww * scale, out_shape.shape[-1]), out_shape.dtype)
    return jax.lax.fori_loop(0, len(grid), body, out)


def _resnet_block(block: ResnetBlock, params, x: jax.Array, tile: int) -> jax.Array:
    """block(x) in two sweeps (norm1 .. conv1, then norm2 .. conv2 + shortcut), each norm with
    the statistics of its whole input."""
    stats1 = group_stats(x, block.num_groups)

    def first_half(xw):
        captured = {}

        def swap(next_fun, args, kwargs, context):
            name = context.module.name if context.method_name == "__call__" else None
            if name == "norm1":
                return next_fun(args[0], stats=stats1)
            if name == "norm2":
                captured["h"] = args[0]
                raise _Stop
            return next_fun(*args, **kwargs)

        try:
            with nn.intercept_methods(swap):
                block.apply({"params": params}, xw)
        except _Stop:
            return captured["h"]
        raise AssertionError("ResnetBlock ran without norm2")

    h = sweep(first_half, (x,), tile)
    stats2 = group_stats(h, block.num_groups)

    def second_half(xw, hw):
        def swap(next_fun, args, kwargs, context):
            name = context.module.name if context.method_name == "__call__" else None
            if name == "conv1":
                return hw  # held from the first sweep; norm1 and conv1 of this call are dead code
            if name == "norm2":
                return next_fun(args[0], stats=stats2)
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(swap):
            return block.apply({"params": params}, xw)

    return sweep(second_half, (x, h), tile)


def decode_tiled(model: AutoEncoder, params, z: jax.Array, *, tile: int = TILE) -> jax.Array:
    """AutoEncoder.decode in tiles: normalised latents (B, h, w, z_channels) -> pixels (B, 8h, 8w, out_ch)
    float32, unclamped, what `model.apply(..., method="decode")` returns (see the module docstring).

    tile: the core side of a tile in pixels of the activation each sweep reads (tiles of the
    output of an Upsample sweep are twice that). Jit it with `model` and `tile` static.
    """
    cfg, dec = model.config, params["decoder"]
    kw = dict(dtype=model.dtype, param_dtype=model.param_dtype)
    g = cfg.norm_num_groups
    precision = matmul_precision(model.dtype, model.precision)
    with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():
        h = _capture(model, params, z)
        for i in reversed(range(len(cfg.ch_mult))):  # the levels as Decoder runs them
            level = dec[f"up_{i}"]
            for j in range(cfg.num_res_blocks + 1):
                h = _resnet_block(ResnetBlock(cfg.ch * cfg.ch_mult[i], g, **kw), level[f"block_{j}"], h, tile)
            if i != 0:
                up = Upsample(**kw)
                h = sweep(lambda x, p=level["upsample"]: up.apply({"params": p}, x), (h,), tile, scale=2)
        stats = group_stats(h, g)
        norm, conv_out = GroupNorm(g, **kw), conv(cfg.out_ch, 3, name=None, **kw)

        def tail(x):  # Decoder's norm_out, swish, conv_out
            y = nn.swish(norm.apply({"params": dec["norm_out"]}, x, stats=stats))
            return conv_out.apply({"params": dec["conv_out"]}, y)

        return sweep(tail, (h,), tile).astype(jnp.float32)
