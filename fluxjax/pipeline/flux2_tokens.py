"""FLUX.2's token layout on the host and through the VAE: position ids of image and text tokens,
images to tokens (the VAE encoder, batch-normed and packed) and back; what Flux2Pipeline
(flux2.py) and its FlowEdit (flux2_edit.py) share."""

from __future__ import annotations

from functools import partial

import jax.numpy as jnp
import numpy as np

from fluxjax.models import latents2
from fluxjax.models.autoencoder import AutoEncoder
from fluxjax.parallel.strategies import jit_with_rules


def position_ids(batch: int, rows: int, cols: int, time_coord: int = 0) -> np.ndarray:
    """(B, rows*cols, 4) float32 ids (time_coord, row, col, 0) of a row-major token grid."""
    ids = np.zeros((rows, cols, 4), np.float32)
    ids[..., 0] = time_coord
    ids[..., 1] = np.arange(rows)[:, None]
    ids[..., 2] = np.arange(cols)[None, :]
    return np.broadcast_to(ids.reshape(1, rows * cols, 4), (batch, rows * cols, 4))


def text_ids(batch: int, length: int) -> np.ndarray:
    """(B, L, 4) float32 ids (0, 0, 0, j) of the text tokens."""
    ids = np.zeros((batch, length, 4), np.float32)
    ids[..., 3] = np.arange(length)
    return ids


@partial(jit_with_rules, static_argnames=("model",))
def encode_tokens(model: AutoEncoder, params, pixels):
    """Images (B, H, W, 3) float32 in [-1, 1] -> FLUX.2 tokens (B, (H/16)(W/16), 128) float32: the
    posterior mean, patchified, batch-normed and packed (latents2.to_tokens)."""
    z = model.apply({"params": params}, pixels, method="encode")
    return latents2.to_tokens(z, params["bn"], model.config.batch_norm_eps)


@partial(jit_with_rules, static_argnames=("model", "rows", "cols"))
def decode_tokens(model: AutoEncoder, params, tokens, rows: int, cols: int):
    """Tokens (B, rows*cols, 128) -> images (B, 16 rows, 16 cols, 3) float32 in [0, 1]."""
    z = latents2.from_tokens(tokens, params["bn"], model.config.batch_norm_eps, rows, cols)
    pixels = model.apply({"params": params}, z, method="decode")
    return (jnp.clip(pixels, -1.0, 1.0) + 1.0) / 2.0
