"""Images as conditioning: read an image, bring it to a size FLUX accepts, encode it to packed latents.

Used by FlowEdit (fluxjax/flowedit.py) for its source image and by the pipeline's img2img and
inpainting (the strength cut, masks); the image-conditioning variants (Kontext references, Fill,
Control) extend this module.

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
    height, width, name = _source_size(image, name)
    return _target_size(height, width, resize, name)


def original_size(image, name: str = "image") -> tuple[int, int]:
    """(height, width) of `image` as given (before any resize policy), reading only a file's header."""
    return _source_size(image, name)[:2]


def _source_size(image, name: str) -> tuple[int, int, str]:
    """(height, width, name for messages: with the file's path) of an image as given."""
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
        return height, width, f"{name} {path}"
    height, width = _as_array(image, name).shape[:2]
    return height, width, name


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


# --- img2img and base-model inpainting (diffusers' FluxImg2ImgPipeline, FluxInpaintPipeline) ---

DEFAULT_STRENGTH = 0.6  # diffusers' default for both pipelines


def strength_start(num_steps: int, strength: float) -> int:
    """The first step an image-conditioned run takes: the schedule of `num_steps` cut at `strength`.

    As diffusers' get_timesteps: int(max(N - min(N * strength, N), 0)); the run takes the steps
    start .. N-1 from the latents at sigmas[start] (at least one step for any strength > 0).
    UsageError for strength outside (0, 1].
    """
    if isinstance(strength, bool) or not isinstance(strength, (int, float, np.number)) or not 0 < strength <= 1:
        raise UsageError(f"strength must be a number in (0, 1], got {strength!r}")
    return int(max(num_steps - min(num_steps * float(strength), num_steps), 0))


def load_mask(mask, size: tuple[int, int], resize: str | None = None, name: str = "mask_image") -> np.ndarray:
    """An inpainting mask as float32 (H, W) of 0 (keep) and 1 (repaint), for an image of `size`.

    mask: a path, a PIL image (converted to grayscale "L" as diffusers' mask processor does), or
    an array (H, W) or (H, W, 3) of uint8 or floats in [0, 1]; binarized at 0.5 (diffusers'
    do_binarize). It must have the size of the image as given (before any resize policy), and is
    then cropped or scaled as the image is. size: the image's (height, width) before resizing.
    """
    if isinstance(mask, (str, os.PathLike)):
        from PIL import Image

        path = os.fspath(mask)
        if not os.path.isfile(path):
            raise UsageError(f"{name} {path}: no such file")
        with Image.open(path) as im:
            mask = im.convert("L")
    if hasattr(mask, "convert") and hasattr(mask, "size"):
        gray = np.asarray(mask.convert("L"))
    else:
        array = np.asarray(mask)
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
            raise UsageError(f"{name}: expected a grayscale (H, W) or RGB (H, W, 3) mask, got shape {array.shape}")
        if array.dtype != np.uint8 and (not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all()
                                        or array.min() < 0 or array.max() > 1):
            raise UsageError(f"{name}: expected uint8 values or floats in [0, 1], got {array.dtype}")
        gray = array if array.dtype == np.uint8 else np.round(array * 255.0).astype(np.uint8)
        if gray.ndim == 3:  # RGB to gray as PIL's "L" (ITU-R 601-2 luma), what a PIL mask gets
            from PIL import Image

            gray = np.asarray(Image.fromarray(gray).convert("L"))
    if gray.shape != tuple(size):
        raise UsageError(f"{name} is {gray.shape[1]}x{gray.shape[0]} but the image is {size[1]}x{size[0]}: "
                         "a mask must have the image's size")
    height, width = _target_size(*gray.shape, resize, name)
    if (height, width) != gray.shape:
        if resize == "crop":
            gray = gray[:height, :width]
        else:
            from PIL import Image

            gray = np.asarray(Image.fromarray(gray).resize((width, height), Image.Resampling.LANCZOS))
    # diffusers: pixels / 255 as float32, then 0 below 0.5 and 1 from 0.5 on.
    return (gray.astype(np.float32) / 255.0 >= 0.5).astype(np.float32)


def mask_latents(masks: np.ndarray) -> np.ndarray:
    """Pixel masks (B, H, W) -> (B, (H/16)(W/16), 64) float32, the packed latent mask of the loop.

    As FluxInpaintPipeline: nearest-neighbour resize to the latent grid (torch's "nearest" takes
    the top-left pixel of each 8 x 8 block), repeated over the 16 latent channels, packed.
    """
    small = masks[:, ::8, ::8]
    repeated = np.repeat(small[:, None], sampling.LATENT_CHANNELS, axis=1)
    return np.asarray(sampling.pack(repeated))


def check_request(prefix: str = "", name=lambda key: key, image=None, strength=None, mask=None, resize=None,
                  references=(), control=None, negative_prompt=None, true_cfg=None, prompt_2=None, sigmas=None,
                  steps=None, height=None, width=None) -> tuple[int | None, int | None, list[float] | None]:
    """Check a conditioned request before any model is loaded: files, sizes, pairs, ranges.

    Shared by `fluxjax generate` (name: the flag of a key, prefix "") and `fluxjax batch` (prefix
    "FILE:LINE: ", name: the JSONL key). image, mask, references, control: paths; sigmas: a list.
    Returns (height, width, sigmas as floats): the image's size when an image is given (UsageError
    if height/width say another), else those given. What depends on the checkpoint (a reference
    on a base model) is the pipeline's to refuse once loaded.
    """
    from fluxjax.text import check_prompt

    def fail(message: str):
        raise UsageError(prefix + message)

    for key, value in (("strength", strength), ("mask", mask), ("resize", resize)):
        if value is not None and image is None:
            fail(f"{name(key)} needs {name('image')}")
    if (negative_prompt is None) != (true_cfg is None):
        fail(f"{name('negative_prompt')} and {name('true_cfg')} go together (true CFG needs both)")
    try:
        if strength is not None:
            strength_start(1, strength)  # the range
        if true_cfg is not None and (isinstance(true_cfg, bool) or not isinstance(true_cfg, (int, float))
                                     or not (np.isfinite(true_cfg) and true_cfg > 1)):
            raise UsageError(f"must be a number > 1, got {true_cfg!r}")
        for key, text in (("negative_prompt", negative_prompt), ("prompt_2", prompt_2)):
            if text is not None:
                check_prompt(name(key), text)
        if sigmas is not None:
            sigmas = sampling.check_sigmas(sigmas)
    except UsageError as e:
        message = str(e)
        for key in ("strength", "sigmas"):  # name the key as this caller does
            message = name(key) + message[len(key):] if message.startswith(key + " ") else message
        fail(message if not message.startswith("must") else f"{name('true_cfg')} {message}")
    if sigmas is not None and steps is not None and steps != len(sigmas):
        fail(f"{name('steps')} {steps} but {len(sigmas)} {name('sigmas')}: give one of them")
    for key, path in [("image", image), ("mask", mask), ("control", control)] + [("references", r) for r in references]:
        if path is not None and not os.path.isfile(path):
            fail(f"{name(key)} {path}: no such file")
    if image is None:
        return height, width, sigmas
    try:
        size = image_size(image, resize, name("image"))
        if (height or size[0], width or size[1]) != size:
            raise UsageError(f"{name('image')} {image} is {size[1]}x{size[0]}: leave {name('height')}/{name('width')} "
                             "unset, or give its size")
        if mask is not None:
            load_mask(mask, original_size(image, name("image")), resize, f"{name('mask')} {mask}")
    except UsageError as e:
        fail(str(e))
    return size[0], size[1], sigmas
