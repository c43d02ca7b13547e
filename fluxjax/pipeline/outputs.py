"""What a pipeline call gives back: packed latents through the VAE decoder, gathered from every
host, checked finite, as float arrays or PIL images."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from fluxjax.errors import NonFiniteError
from fluxjax.models.autoencoder import AutoEncoder
from fluxjax.parallel.strategies import jit_with_rules
from fluxjax.sampling import sampler as sampling


@partial(jit_with_rules, static_argnames=("model", "height", "width"))
def decode_packed(model: AutoEncoder, params, packed, height: int, width: int):
    """Packed latents (B, (H/16)(W/16), 64) -> images (B, H, W, 3) float32 in [0, 1]."""
    latents = sampling.unpack(packed, height, width).transpose(0, 2, 3, 1)  # NCHW -> NHWC
    pixels = model.apply({"params": params}, latents, method="decode")
    return (jnp.clip(pixels, -1.0, 1.0) + 1.0) / 2.0


def gather(x: jax.Array) -> np.ndarray:
    """A (possibly multi-host) global array as one host NumPy array, on every process."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def check_output(images: np.ndarray, what: str = "images") -> None:
    """Raise NonFiniteError when any of `images` (B, ...) holds NaN or infinity, naming which.

    A non-finite value (from non-finite weights or inputs) would otherwise be written as a black
    or saturated PNG and counted as done.
    """
    bad = [i for i in range(images.shape[0]) if not np.isfinite(images[i]).all()]
    if bad:
        raise NonFiniteError(f"{what} {', '.join(map(str, bad))} of the batch came out with NaN or infinite values "
                             "(non-finite weights or inputs); nothing is written for them")


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) float in [0, 1] -> uint8, rounded to nearest as diffusers' numpy_to_pil does."""
    return np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)


def as_output(images: np.ndarray, output: str):
    """Images (B, H, W, 3) float32 in [0, 1] as `output` asks: "np" as they are, "pil" a list of PIL images."""
    if output == "np":
        return images
    from PIL import Image

    return [Image.fromarray(u8) for u8 in to_uint8(images)]
