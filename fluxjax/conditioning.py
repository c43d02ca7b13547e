"""Images as conditioning: read an image, bring it to a size FLUX accepts, encode it to packed latents.

Used by FlowEdit (fluxjax/flowedit.py) for its source image; the image-conditioning variants
(img2img, Kontext references, masks) extend this module.

Sizes: FLUX's latents are packed in 16 x 16 pixel patches, so an image must be a multiple of 16
on both sides. One that is not is refused unless a resize policy is given:
  "crop":  drop the right and bottom remainder (at most 15 pixels each), as the FlowEdit
           authors' code does; the kept pixels are the image's own.
  "scale": resample (Lanczos) to the nearest multiples of 16 (at least 16).
"""

from __future__ import annotations

import os
from functools import partial

import numpy as np

from fluxjax import sampling
from fluxjax.errors import UsageError
from fluxjax.models.autoencoder import AutoEncoder
from fluxjax.sharding import jit_with_rules

RESIZE_POLICIES = ("crop", "scale")


def image_size(image, resize: str | None = None, name: str = "image") -> tuple[int, int]:
    """(height, width) `load_image(image, resize)` gives, reading only a file's header; UsageError
    naming `name` for a missing or unreadable file or a size that needs a policy it lacks."""
    if isinstance(image, (str, os.PathLike)):
        from PIL import Image, UnidentifiedImageError

        path = os.fspath(image)
        if not os.path.isfile(path):
            raise UsageError(f"{name} {path}: no such file")
        try:
            with Image.open(path) as im:
                width, height = im.size
        except (UnidentifiedImageError, OSError) as e:
            raise UsageError(f"{name} {path}: not an image PIL can read ({e})") from None
        name = f"{name} {path}"
    else:
        height, width = _as_array(image, name).shape[:2]
    return _target_size(height, width, resize, name)


def load_image(image, resize: str | None = None, name: str = "image") -> np.ndarray:
    """An image as uint8 (H, W, 3) with H and W multiples of 16.

    image: a file path, a PIL image, or an array (H, W, 3) of uint8 or of floats in [0, 1].
    resize: None (refuse a size that is not a multiple of 16), "crop" or "scale" (module docstring).
    name: what error messages call the image (an argument or "FILE:LINE").
    """
    if isinstance(image, (str, os.PathLike)):
        from PIL import Image

        image_size(image, resize, name)  # one-line errors for a missing or unreadable file, a bad size
        with Image.open(os.fspath(image)) as im:
            image = im.convert("RGB")
    pixels = _as_array(image, name)
    height, width = _target_size(*pixels.shape[:2], resize, name)
    if (height, width) == pixels.shape[:2]:
        return pixels
    if resize == "crop":
        return np.ascontiguousarray(pixels[:height, :width])
    from PIL import Image

    return np.asarray(Image.fromarray(pixels).resize((width, height), Image.Resampling.LANCZOS))


def _as_array(image, name: str) -> np.ndarray:
    """uint8 (H, W, 3) from a PIL image or an array of uint8 or floats in [0, 1]."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise UsageError(f"{name}: expected an RGB image (H, W, 3), got an array of shape {array.shape}")
    if array.dtype == np.uint8:
        return array
    if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
        raise UsageError(f"{name}: expected uint8 pixels or floats in [0, 1], got {array.dtype} values "
                         f"from {array.min()} to {array.max()}")
    return np.round(array * 255.0).astype(np.uint8)


def _target_size(height: int, width: int, resize: str | None, name: str) -> tuple[int, int]:
    step = sampling.PIXELS_PER_TOKEN
    if resize is not None and resize not in RESIZE_POLICIES:
        raise UsageError(f"resize must be one of {', '.join(RESIZE_POLICIES)} or None, got {resize!r}")
    if height % step == 0 and width % step == 0 and min(height, width) >= step:
        return height, width
    if resize is None:
        raise UsageError(f"{name} is {width}x{height}, not a multiple of {step} on both sides; give a resize "
                         f"policy ('crop' drops the right/bottom remainder, 'scale' resamples to the nearest multiple)")
    if resize == "crop":
        if min(height, width) < step:
            raise UsageError(f"{name} is {width}x{height}: too small to crop to a multiple of {step}")
        return height // step * step, width // step * step
    return max(step, round(height / step) * step), max(step, round(width / step) * step)


def to_model_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 (B, H, W, 3) -> float32 in [-1, 1], the VAE encoder's input (u8 / 127.5 - 1)."""
    return images.astype(np.float32) / 127.5 - 1.0


@partial(jit_with_rules, static_argnames=("model",))
def encode_packed(model: AutoEncoder, params, pixels):
    """Images (B, H, W, 3) float in [-1, 1] -> packed latents (B, (H/16)(W/16), 64) float32.

    The encoder's posterior mean (BFL's default, diffusers' `latent_dist.mode()`, what FlowEdit
    uses), normalised `scale (z - shift)`, then packed in 2x2 patches (sampling.pack).
    """
    z = model.apply({"params": params}, pixels, method="encode")  # (B, H/8, W/8, 16) NHWC
    return sampling.pack(z.transpose(0, 3, 1, 2))
