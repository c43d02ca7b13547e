"""FLUX.2 latents between the VAE and the transformer: 2x2 patches, the batch norm, tokens.

diffusers' Flux2KleinPipeline (pipelines/flux2/pipeline_flux2_klein.py) takes the VAE's latent
mean (B, 32, H/8, W/8), `_patchify_latents` it to (B, 128, H/16, W/16) (channel c*4 + dy*2 + dx),
normalises each of the 128 channels with the VAE's BatchNorm running statistics
`(x - running_mean) / sqrt(running_var + batch_norm_eps)`, and `_pack_latents` it to tokens
(B, H/16*W/16, 128) in row-major (row, column) order; after sampling it runs the inverse
(`_unpack_latents_with_ids`, the denormalisation, `_unpatchify_latents`) before `vae.decode`.

Layout: NCHW, as diffusers' `latents` and fluxjax's FLUX.1 `sampling.pack`; the VAE itself runs
NHWC (`to_tokens` / `from_tokens` transpose at that boundary). FLUX.1's packed tokens are this
module's `pack(patchify(z))` (the same c*4 + dy*2 + dx feature order) without the batch norm.

Numerics: everything in float32 (the statistics upcast from the parameter dtype).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

PATCH = 2  # AutoencoderKLFlux2 patch_size (2, 2)


def patchify(latents: jax.Array) -> jax.Array:
    """(B, C, h, w) -> (B, 4C, h/2, w/2), any dtype kept: each 2x2 patch into channels c*4 + dy*2 + dx.

    h and w must be even (diffusers' `_patchify_latents`).
    """
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // PATCH, PATCH, w // PATCH, PATCH)
    x = x.transpose(0, 1, 3, 5, 2, 4)  # b, c, dy, dx, row, col
    return x.reshape(b, c * PATCH * PATCH, h // PATCH, w // PATCH)


def unpatchify(x: jax.Array) -> jax.Array:
    """(B, 4C, h, w) -> (B, C, 2h, 2w), dtype kept: the inverse of `patchify`."""
    b, c4, h, w = x.shape
    x = x.reshape(b, c4 // (PATCH * PATCH), PATCH, PATCH, h, w)
    x = x.transpose(0, 1, 4, 2, 5, 3)  # b, c, row, dy, col, dx
    return x.reshape(b, c4 // (PATCH * PATCH), h * PATCH, w * PATCH)


def _std(bn: Mapping[str, jax.Array], eps: float) -> tuple[jax.Array, jax.Array]:
    """(mean, std), each (1, C, 1, 1) float32, from `bn` = {"running_mean": (C,), "running_var": (C,)}."""
    mean = jnp.asarray(bn["running_mean"], jnp.float32)[None, :, None, None]
    var = jnp.asarray(bn["running_var"], jnp.float32)[None, :, None, None]
    return mean, jnp.sqrt(var + eps)


def normalize(x: jax.Array, bn: Mapping[str, jax.Array], eps: float) -> jax.Array:
    """(B, C, h, w) patchified latents -> (B, C, h, w) float32 `(x - running_mean) / sqrt(running_var + eps)`.

    bn:  the VAE's `bn` parameters ({"running_mean", "running_var"}, each (C,), C = 4 * z_channels).
    eps: the VAE config's `batch_norm_eps` (AutoEncoderConfig.batch_norm_eps).
    """
    mean, std = _std(bn, eps)
    return (x.astype(jnp.float32) - mean) / std


def denormalize(x: jax.Array, bn: Mapping[str, jax.Array], eps: float) -> jax.Array:
    """(B, C, h, w) -> (B, C, h, w) float32 `x * sqrt(running_var + eps) + running_mean`: the inverse of `normalize`."""
    mean, std = _std(bn, eps)
    return x.astype(jnp.float32) * std + mean


def pack(x: jax.Array) -> jax.Array:
    """(B, C, h, w) -> (B, h*w, C) tokens, row-major (token r*w + c is row r, column c), dtype kept."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h * w).transpose(0, 2, 1)


def unpack(tokens: jax.Array, rows: int, cols: int) -> jax.Array:
    """(B, rows*cols, C) -> (B, C, rows, cols), dtype kept: the inverse of `pack` (diffusers'
    `_unpack_latents_with_ids` with the ids `_prepare_latent_ids` gives)."""
    b, n, c = tokens.shape
    if n != rows * cols:
        raise ValueError(f"unpack: {n} tokens are not {rows} x {cols}")
    return tokens.transpose(0, 2, 1).reshape(b, c, rows, cols)


def to_tokens(latents: jax.Array, bn: Mapping[str, jax.Array], eps: float) -> jax.Array:
    """The VAE's latents (B, H/8, W/8, z) **NHWC** (what AutoEncoder.encode returns) -> the
    transformer's tokens (B, H/16*W/16, 4z) float32: patchify, normalise, pack."""
    return pack(normalize(patchify(latents.transpose(0, 3, 1, 2)), bn, eps))


def from_tokens(tokens: jax.Array, bn: Mapping[str, jax.Array], eps: float, rows: int, cols: int) -> jax.Array:
    """Tokens (B, rows*cols, 4z) -> the VAE's latents (B, 2*rows, 2*cols, z) **NHWC** float32 (what
    AutoEncoder.decode takes): unpack, denormalise, unpatchify. rows, cols = H/16, W/16."""
    return unpatchify(denormalize(unpack(tokens, rows, cols), bn, eps)).transpose(0, 2, 3, 1)
