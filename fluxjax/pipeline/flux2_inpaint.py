"""FLUX.2 [klein] inpainting inputs, as diffusers' Flux2KleinInpaintPipeline prepares them (host side);
the image of img2img is prepared as inpainting's (`image_pixels`).

The image: scaled (Lanczos) to about 1024**2 pixels when larger, then resized (Lanczos, not cropped)
to its sides rounded down to multiples of 16; it sets the output size. The mask: grayscale, resized
as the image, binarized at 0.5 (conditioning.load_mask), then bilinearly reduced to one value per
token (torch's interpolate, align_corners=False: at a 16x reduction the mean of each 16 x 16 block's
four centre pixels), so a token on the mask's edge is blended partly. The loop (sampling.euler_loop
with Conditioning image_latents/noise/mask) keeps (1 - mask) of the known image re-noised to each
step's time; the image's tokens are also the first reference (time 10) at every step.
"""

from __future__ import annotations

import os

import numpy as np

from fluxjax.errors import UsageError
from fluxjax.pipeline.conditioning import load_mask
from fluxjax.sampling import sampler as sampling

INPAINT_STRENGTH = 0.8  # Flux2KleinInpaintPipeline's default strength
MAX_AREA = 1024 * 1024


def _pil(image, name: str, mode: str):
    from PIL import Image

    from fluxjax.images import read_image

    if isinstance(image, (str, os.PathLike)):
        return read_image(image, name).convert(mode), f"{name} {os.fspath(image)}"
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] != 3):
            raise UsageError(f"{name}: expected a uint8 array (H, W) or (H, W, 3), got {image.dtype} {image.shape}")
        return Image.fromarray(image).convert(mode), name
    if not isinstance(image, Image.Image):
        raise UsageError(f"{name}: expected a path, a PIL image or a uint8 array, got {type(image).__name__}")
    return image.convert(mode), name


def _target(width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((w, h) after the area cap, (w, h) rounded down to multiples of 16)."""
    if width * height > MAX_AREA:
        scale = (MAX_AREA / (width * height)) ** 0.5
        width, height = int(width * scale), int(height * scale)
    step = sampling.PIXELS_PER_TOKEN
    return (width, height), (width // step * step, height // step * step)


def _resized(image, sizes):
    from PIL import Image

    for size in sizes:
        if image.size != size:
            image = image.resize(size, Image.Resampling.LANCZOS)
    return image


def _image(image):
    """(PIL image, its name in messages, its sizes as `_target` gives them); UsageError under 16 pixels a side."""
    pil, name = _pil(image, "image", "RGB")
    sizes = _target(*pil.size)
    if min(sizes[1]) < sampling.PIXELS_PER_TOKEN:
        raise UsageError(f"{name} is {pil.size[0]}x{pil.size[1]}: too small (16 pixels a side at least)")
    return pil, name, sizes


def image_pixels(image) -> np.ndarray:
    """The image of img2img prepared as inpainting's: uint8 (H, W, 3), H and W multiples of 16.

    image: a path, a PIL image or a uint8 array. UsageError for an image under 16 pixels a side.
    """
    pil, _, sizes = _image(image)
    return np.asarray(_resized(pil, sizes))


def inpaint_inputs(image, mask_image) -> tuple[np.ndarray, np.ndarray]:
    """(pixels uint8 (H, W, 3), mask float32 (H, W) of 0 keep / 1 repaint), H and W multiples of 16.

    image, mask_image: paths, PIL images or uint8 arrays of one size. UsageError naming the argument
    for an image under 16 pixels a side or a mask of another size.
    """
    pil, name, sizes = _image(image)
    mask, mask_name = _pil(mask_image, "mask_image", "L")
    if mask.size != pil.size:
        raise UsageError(f"{mask_name} is {mask.size[0]}x{mask.size[1]} but the image is {pil.size[0]}x{pil.size[1]}: "
                         "a mask must have the image's size")
    width, height = sizes[1]
    return np.asarray(_resized(pil, sizes)), load_mask(_resized(mask, sizes), (height, width), name=mask_name)


def mask_tokens(mask: np.ndarray, batch: int, channels: int) -> np.ndarray:
    """(H, W) float32 pixel mask -> (B, (H/16)(W/16), channels) float32, one value per token
    (bilinear at the 16x reduction: the mean of each block's pixels (7, 7), (7, 8), (8, 7), (8, 8))."""
    step = sampling.PIXELS_PER_TOKEN
    c = step // 2 - 1
    small = (mask[c::step, c::step] + mask[c::step, c + 1::step] + mask[c + 1::step, c::step]
             + mask[c + 1::step, c + 1::step]) * np.float32(0.25)
    tokens = small.reshape(1, -1, 1).astype(np.float32)
    return np.ascontiguousarray(np.broadcast_to(tokens, (batch, tokens.shape[1], channels)))
