"""Images as conditioning: read an image, bring it to a size FLUX accepts, encode it to packed latents.

Used by FlowEdit (fluxjax/sampling/flowedit.py) for its source image and by the pipeline's conditioned
generation: img2img and inpainting (the strength cut, masks), and the model variants read from a
checkpoint (`variant_of`) with the inputs each takes, built as diffusers' pipelines build them
(docs/model-reference.md, "Variants"):
  kontext  reference images (FluxKontextPipeline): resized to a preferred Kontext resolution,
           VAE-encoded, packed, ids (i + 1, row, col) for reference i; appended after the image
           tokens in the sequence (`kontext_inputs`, then `encode_variant` -> ref_img, ref_ids).
  fill     in_channels 384 (FluxFillPipeline): image + mask -> latents of the masked image (64)
           and the pixel mask packed to 256 features, concatenated to x (`encode_variant`).
  control  in_channels 128 (FluxControlPipeline): the control image's latents (64) concatenated
           to x (`encode_variant`).

Sizes: FLUX's latents are packed in 16 x 16 pixel patches, so an image must be a multiple of 16
on both sides. One that is not is refused unless a resize policy is given:
  "crop":  drop the right and bottom remainder (at most 15 pixels each), as the FlowEdit
           authors' code does; the kept pixels are the image's own.
  "scale": resample (Lanczos) to the nearest multiples of 16 (at least 16).
"""

from __future__ import annotations

import os
from functools import partial

import jax.numpy as jnp
import numpy as np

from fluxjax.sampling import sampler as sampling
from fluxjax.errors import UsageError
from fluxjax.images import read_image, rgb8
from fluxjax.models.autoencoder import AutoEncoder
from fluxjax.parallel.strategies import jit_with_rules

RESIZE_POLICIES = ("crop", "scale")


def image_size(image, resize: str | None = None, name: str = "image") -> tuple[int, int]:
    """(height, width) `load_image(image, resize)` gives; UsageError naming `name` for a missing or
    unreadable file or a size that needs a policy it lacks. A file is decoded in full
    (images.read_image), so a truncated one is refused here, before any model is loaded."""
    height, width, name = _source_size(image, name)
    return _target_size(height, width, resize, name)


def original_size(image, name: str = "image") -> tuple[int, int]:
    """(height, width) of `image` as given (before any resize policy; after its EXIF orientation)."""
    return _source_size(image, name)[:2]


def _source_size(image, name: str) -> tuple[int, int, str]:
    """(height, width, name for messages: with the file's path) of an image as given."""
    if isinstance(image, (str, os.PathLike)):
        width, height = read_image(image, name).size
        return height, width, f"{name} {os.fspath(image)}"
    height, width = _as_array(image, name).shape[:2]
    return height, width, name


def load_image(image, resize: str | None = None, name: str = "image") -> np.ndarray:
    """An image as uint8 (H, W, 3) with H and W multiples of 16.

    image: a file path, a PIL image, or an array (H, W, 3) of uint8 or of floats in [0, 1].
    resize: None (refuse a size that is not a multiple of 16), "crop" or "scale" (module docstring).
    name: what error messages call the image (an argument or "FILE:LINE").
    """
    if isinstance(image, (str, os.PathLike)):
        image, name = read_image(image, name), f"{name} {os.fspath(image)}"
    pixels = _as_array(image, name)
    height, width = _target_size(*pixels.shape[:2], resize, name)
    if (height, width) == pixels.shape[:2]:
        return pixels
    if resize == "crop":
        return np.ascontiguousarray(pixels[:height, :width])
    from PIL import Image

    return np.asarray(Image.fromarray(pixels).resize((width, height), Image.Resampling.LANCZOS))


def load_images(images, resize: str | None = None, name: str = "image") -> list[np.ndarray]:
    """One image or a list of them (`load_image` each, named "NAME i" in a list) as uint8
    (H, W, 3) arrays of one size; UsageError for an empty list or images of several sizes."""
    given = list(images) if isinstance(images, (list, tuple)) else [images]
    if not given:
        raise UsageError(f"{name}: an empty list")
    names = [name] if len(given) == 1 else [f"{name} {i}" for i in range(len(given))]
    pixels = [load_image(im, resize, n) for im, n in zip(given, names)]
    if len({p.shape for p in pixels}) > 1:
        raise UsageError(f"the {name}s of one call must have one size, got "
                         + ", ".join(f"{p.shape[1]}x{p.shape[0]}" for p in pixels))
    return pixels


def _as_array(image, name: str) -> np.ndarray:
    """uint8 (H, W, 3) from a PIL image or an array of uint8 or floats in [0, 1]."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
        return np.asarray(rgb8(image))
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


def packed_latents(model: AutoEncoder, params, pixels):
    """Images (B, H, W, 3) float in [-1, 1] -> packed latents (B, (H/16)(W/16), 64) float32.

    The encoder's posterior mean (BFL's default, diffusers' `latent_dist.mode()`, what FlowEdit
    uses), normalised `scale (z - shift)`, then packed in 2x2 patches (sampling.pack).
    """
    z = model.apply({"params": params}, pixels, method="encode")  # (B, H/8, W/8, 16) NHWC
    return sampling.pack(z.transpose(0, 3, 1, 2))


encode_packed = jit_with_rules(packed_latents, static_argnames=("model",))
"""`packed_latents` compiled once per VAE, image shape and strategy."""


# --- img2img and base-model inpainting (diffusers' FluxImg2ImgPipeline, FluxInpaintPipeline) ---

DEFAULT_STRENGTH = 0.6  # diffusers' default for both pipelines


def strength_start(num_steps: int, strength: float, name: str = "strength") -> int:
    """The first step an image-conditioned run takes: the schedule of `num_steps` cut at `strength`.

    As diffusers' get_timesteps: int(max(N - min(N * strength, N), 0)); the run takes the steps
    start .. N-1 from the latents at sigmas[start] (at least one step for any strength > 0).
    UsageError (naming `name`) for strength outside (0, 1].
    """
    if isinstance(strength, bool) or not isinstance(strength, (int, float, np.number)) or not 0 < strength <= 1:
        raise UsageError(f"{name} must be a number in (0, 1], got {strength!r}")
    return int(max(num_steps - min(num_steps * float(strength), num_steps), 0))


def load_mask(mask, size: tuple[int, int], resize: str | None = None, name: str = "mask_image") -> np.ndarray:
    """An inpainting mask as float32 (H, W) of 0 (keep) and 1 (repaint), for an image of `size`.

    mask: a path, a PIL image (converted to grayscale "L" as diffusers' mask processor does), or
    an array (H, W) or (H, W, 3) of uint8 or floats in [0, 1]; binarized at 0.5 (diffusers'
    do_binarize). It must have the size of the image as given (before any resize policy), and is
    then cropped or scaled as the image is. size: the image's (height, width) before resizing.
    """
    if isinstance(mask, (str, os.PathLike)):
        mask, name = read_image(mask, name), f"{name} {os.fspath(mask)}"
    if hasattr(mask, "convert") and hasattr(mask, "size"):
        gray = np.asarray(rgb8(mask).convert("L"))
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
                  references=(), control=None, negative_prompt=None, true_cfg=None, sigmas=None,
                  steps=None, height=None, width=None) -> tuple[int | None, int | None]:
    """Check the relations of a conditioned request before any model is loaded: files, sizes, pairs.

    Called by request.check (fluxjax/pipeline/request.py), after each option's own check: for
    `fluxjax generate` (name: the flag of a key, prefix "") and `fluxjax batch` (prefix
    "FILE:LINE: ", name: the JSONL key). image, mask, references, control: paths; sigmas: floats.
    Returns (height, width): the image's size when an image is given (UsageError if
    height/width say another), else those given. What depends on the checkpoint (a reference on
    a base model) is the pipeline's to refuse once loaded.
    """
    def fail(message: str):
        raise UsageError(prefix + message)

    for key, value in (("strength", strength), ("mask", mask), ("resize", resize)):
        # resize also serves control and reference images; the others need an image.
        if value is not None and image is None and not (key == "resize" and (references or control is not None)):
            fail(f"{name(key)} needs {name('image')}")
    if (negative_prompt is None) != (true_cfg is None):
        fail(f"{name('negative_prompt')} and {name('true_cfg')} go together (true CFG needs both)")
    if sigmas is not None and steps is not None and steps != len(sigmas):
        fail(f"{name('steps')} {steps} but {len(sigmas)} {name('sigmas')}: give one of them")
    try:
        # Each file decoded in full (images.read_image): a truncated image, a decompression bomb or
        # a FIFO is refused here in one line, not after minutes of loading.
        # (A mask needs an image, checked above; load_mask reads it below.)
        files = [("image", image), ("control", control)] + [("references", r) for r in references]
        sizes = [read_image(path, name(key)).size for key, path in files if path is not None]
    except UsageError as e:
        fail(str(e))
    if image is None:
        return height, width
    try:
        given = sizes[0][::-1]  # the image's (height, width): it comes first
        size = _target_size(*given, resize, f"{name('image')} {image}")
        if (height or size[0], width or size[1]) != size:
            raise UsageError(f"{name('image')} {image} is {size[1]}x{size[0]}: leave {name('height')}/{name('width')} "
                             "unset, or give its size")
        if mask is not None:
            load_mask(mask, given, resize, name("mask"))
    except UsageError as e:
        fail(str(e))
    return size[0], size[1]


# --- model variants -----------------------------------------------------------------------------

VARIANTS = ("base", "fill", "control", "kontext")
KONTEXT_PIPELINE = "FluxKontextPipeline"  # model_index.json's _class_name of FLUX.1-Kontext checkpoints
MASK_FEATURES = sampling.PIXELS_PER_TOKEN ** 2  # a token's 16 x 16 mask pixels: 8 x 8 per latent pixel, 2 x 2 packed
# in_channels beyond the 64 of x, per variant that widens the transformer's input (docs/model-reference.md, "Fill" and "Control").
EXTRA_CHANNELS = {"fill": 64 + MASK_FEATURES, "control": 64}


def variant_of(in_channels: int, pipeline_class: str | None = None, declared: str | None = None,
               where: str = "the transformer") -> str:
    """The model variant ("base", "fill", "control" or "kontext") of a transformer.

    in_channels: its input features (64 base and Kontext, 128 control, 384 fill);
    pipeline_class: model_index.json's `_class_name` (FluxKontextPipeline marks Kontext, whose
        weights have dev's shapes), None when there is no such file (a single file);
    declared: what the caller says it is (`from_pretrained(variant=)`), None to read it: needed
        for a Kontext single file. A declaration the input width contradicts is refused.
    """
    base = sampling.LATENT_CHANNELS * sampling.PATCH ** 2
    by_width = {base + extra: name for name, extra in EXTRA_CHANNELS.items()}
    if in_channels != base and in_channels not in by_width:
        raise UsageError(f"{where} has {in_channels} input channels; FLUX variants have {base} (base, Kontext), "
                         f"{base + EXTRA_CHANNELS['control']} (control) or {base + EXTRA_CHANNELS['fill']} (fill)")
    read = by_width.get(in_channels, "kontext" if pipeline_class == KONTEXT_PIPELINE else "base")
    if declared is None:
        return read
    if declared not in VARIANTS:
        raise UsageError(f"variant must be one of {', '.join(VARIANTS)} or None, got {declared!r}")
    if declared != read and not (declared in ("base", "kontext") and read in ("base", "kontext")):
        raise UsageError(f"variant={declared!r}, but {where} has {in_channels} input channels, a {read} model")
    return declared


def check_use(variant: str, name: str, *, image=None, mask_image=None, reference_images=None, control_image=None,
              allow_references: bool = False) -> None:
    """Raise UsageError (one line) for inputs the `variant` of model `name` cannot take:
    a mask on a Kontext or control model; a control image on a model without control inputs, or
    a control model without one; references on anything but Kontext (a base model takes them
    only with allow_references=True: it was not trained on them); a Fill model without image
    and mask."""
    def refuse(why, hint=""):
        raise UsageError(f"{why}; {name} is a {variant} model" + (f" ({hint})" if hint else ""))

    if reference_images is not None and not list(reference_images):
        raise UsageError("reference_images is empty: give at least one reference image (or leave it None)")
    if reference_images is not None and variant != "kontext":
        if variant != "base":
            refuse("reference_images needs a FLUX.1 Kontext checkpoint", "or a base model with allow_references=True")
        if not allow_references:
            refuse("reference_images needs a FLUX.1 Kontext checkpoint",
                   "pass allow_references=True to append references to a model not trained on them")
    if mask_image is not None and variant in ("kontext", "control"):
        refuse("mask_image is for inpainting with a base or Fill model",
               "Kontext edits from reference_images" if variant == "kontext" else "")
    if control_image is not None and variant != "control":
        refuse("control_image needs a FLUX.1 Control checkpoint",
               "in_channels 128: FLUX.1-Canny/Depth-dev, or a base model with a control LoRA loaded")
    if variant == "control" and control_image is None:
        refuse("a control model needs control_image=", "the edge or depth map the image follows")
    if variant == "fill" and (image is None or mask_image is None):
        refuse("a Fill model needs image= and mask_image=", "white = the region to repaint")


# --- Kontext references ---------------------------------------------------------------------------

# The (width, height) pairs FLUX.1 Kontext was trained at, as diffusers' FluxKontextPipeline lists them
# (PREFERRED_KONTEXT_RESOLUTIONS); a reference is resized to the one nearest its aspect ratio.
KONTEXT_RESOLUTIONS = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
    (1568, 672),
)
KONTEXT_MAX_AREA = 1024 ** 2


def kontext_reference_size(height: int, width: int, resolutions=KONTEXT_RESOLUTIONS,
                           name: str | None = None) -> tuple[int, int]:
    """(height, width) a reference of height x width pixels is resized to: the resolution of
    `resolutions` ((width, height) pairs) nearest its aspect ratio, taken after flooring its sides
    to multiples of 16 as diffusers does (ties to the narrower); then floored to multiples of 16.
    name: the reference as the messages call it (with its file's path), if known."""
    step = sampling.PIXELS_PER_TOKEN
    h, w = height - height % step, width - width % step
    if min(h, w) < step:
        what = f"{name} is {width}x{height}:" if name else f"a {width}x{height} reference is"
        raise UsageError(f"{what} smaller than {step}x{step} pixels")
    _, w, h = min((abs(w / h - rw / rh), rw, rh) for rw, rh in resolutions)
    return h // step * step, w // step * step


def kontext_output_size(height: int, width: int, max_area: int = KONTEXT_MAX_AREA) -> tuple[int, int]:
    """(height, width) of a Kontext output asked as height x width: the same aspect ratio with an
    area of `max_area` pixels, floored to multiples of 16 (diffusers' FluxKontextPipeline)."""
    if isinstance(max_area, bool) or not isinstance(max_area, (int, np.integer)) or max_area < sampling.PIXELS_PER_TOKEN ** 2:
        raise UsageError(f"max_area must be an integer >= {sampling.PIXELS_PER_TOKEN ** 2}, got {max_area!r}")
    step, aspect = sampling.PIXELS_PER_TOKEN, width / height
    w, h = round((max_area * aspect) ** 0.5) // step * step, round((max_area / aspect) ** 0.5) // step * step
    if min(h, w) < step:
        raise UsageError(f"max_area {max_area} leaves no {step}-pixel side at the aspect ratio {width}:{height}")
    return h, w


def kontext_call_size(height: int | None, width: int | None, default_height: int,
                      default_width: int) -> tuple[int, int, int]:
    """(height, width, max_area) of a Kontext call from the command line or a batch line.

    An asked size (either side given; the other the model's) is made exactly: max_area is its
    area, so `kontext_output_size` keeps it (diffusers' FluxKontextPipeline keeps only the asked
    aspect ratio and makes max_area = 1024**2 pixels, a 64 x 64 request became 1024 x 1024). With
    neither side given, diffusers' default: the model's aspect ratio at KONTEXT_MAX_AREA pixels.
    """
    if height is None and width is None:
        height, width = kontext_output_size(default_height, default_width)
    else:
        height, width = height or default_height, width or default_width
    return height, width, height * width


def kontext_reference_sizes(references, name: str = "reference") -> list[tuple[int, int]]:
    """(height, width) each reference file becomes (`kontext_reference_size` of its size, as
    `kontext_inputs` resizes it): what its tokens cost, known before any model is loaded."""
    sizes = []
    for reference in references:
        height, width, named = _source_size(reference, name)
        sizes.append(kontext_reference_size(height, width, name=named))
    return sizes


def reference_pixels(image, auto_resize: bool = True, resize: str | None = None, name: str = "reference") -> np.ndarray:
    """A Kontext reference as uint8 (h, w, 3): resized (Lanczos) to `kontext_reference_size` when
    auto_resize (diffusers' `_auto_resize`), else brought to multiples of 16 by `resize` as
    `load_image` does."""
    if not auto_resize:
        return load_image(image, resize, name)
    if isinstance(image, (str, os.PathLike)):
        image = read_image(image, name)
    pixels = _as_array(image, name)
    height, width = kontext_reference_size(*pixels.shape[:2])
    return _resized(pixels, height, width)


def _resized(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    if pixels.shape[:2] == (height, width):
        return pixels
    from PIL import Image

    return np.asarray(Image.fromarray(pixels).resize((width, height), Image.Resampling.LANCZOS))


def reference_ids(sizes, batch: int) -> np.ndarray:
    """(B, L_ref, 3) float32 ids of references of `sizes` [(h, w), ...] in pixels: reference i's
    tokens are (i + 1, row, col), row and col from 0 on its own token grid, references in order."""
    ids = []
    for i, (h, w) in enumerate(sizes):
        own = sampling.image_ids(batch, h, w).copy()
        own[..., 0] = i + 1
        ids.append(own)
    return np.concatenate(ids, axis=1)


def kontext_inputs(references, batch: int, auto_resize: bool = True, resize: str | None = None) -> dict:
    """Host inputs of Kontext reference images.

    references: a list of N images (paths, PIL images or arrays (H, W, 3)) shared by the B images
        of a call, or a list of B such lists (one per image, as `fluxjax batch` gives them), each
        of N references whose sizes (after resizing) agree image to image.
    Returns {"ref_pixels": tuple of N (B, h_i, w_i, 3) float32 in [-1, 1], "ref_ids": (B, L_ref, 3)},
    L_ref = sum of (h_i / 16)(w_i / 16); `encode_variant` turns the pixels into `ref_img`.
    """
    references = list(references)
    per_image = all(isinstance(r, (list, tuple)) for r in references)
    lists = [list(r) for r in references] if per_image else [references] * batch
    if len(lists) != batch or len({len(r) for r in lists}) != 1 or not lists[0]:
        raise UsageError(f"reference_images: give one list of references for all {batch} images, or {batch} lists "
                         f"of as many references each, got {[len(r) for r in lists] if per_image else len(references)}")

    def name(b, i):
        return "reference" + (f" {i}" if len(lists[0]) > 1 else "") + (f" of image {b}" if per_image and batch > 1 else "")

    shared = {} if per_image else {i: reference_pixels(r, auto_resize, resize, name(0, i)) for i, r in enumerate(references)}
    pixels = [[shared[i] if not per_image else reference_pixels(r, auto_resize, resize, name(b, i))
               for i, r in enumerate(refs)] for b, refs in enumerate(lists)]
    for i in range(len(lists[0])):
        shapes = {p[i].shape for p in pixels}
        if len(shapes) > 1:
            raise UsageError(f"reference {i}: the images of one call need references of one size, got "
                             + ", ".join(f"{w}x{h}" for h, w, _ in sorted(shapes)))
    return {"ref_pixels": tuple(to_model_pixels(np.stack([p[i] for p in pixels])) for i in range(len(lists[0]))),
            "ref_ids": reference_ids([p.shape[:2] for p in pixels[0]], batch)}


# --- Fill and control -----------------------------------------------------------------------------

def pack_mask(mask: jnp.ndarray) -> jnp.ndarray:
    """(B, H, W) pixel mask -> (B, (H/16)(W/16), 256), as diffusers' FluxFillPipeline packs it: the
    8 x 8 pixels of each latent pixel become 64 channels (index dy * 8 + dx), then 2 x 2 packed."""
    b, h, w = mask.shape
    f = sampling.PIXELS_PER_TOKEN // sampling.PATCH  # the VAE's 8
    m = mask.reshape(b, h // f, f, w // f, f).transpose(0, 2, 4, 1, 3).reshape(b, f * f, h // f, w // f)
    return sampling.pack(m)


@partial(jit_with_rules, static_argnames=("model",))
def encode_variant(model: AutoEncoder, params, inputs: dict) -> dict:
    """Device side of the variants' host inputs (`kontext_inputs`; the pipeline's Fill and control
    pixels), as placed on the devices -> the Conditioning fields they give, float32:
      ref_pixels, ref_ids -> ref_img (B, L_ref, 64) (each reference encoded), ref_ids;
      fill_pixels, fill_mask -> channels (B, L_img, 320): latents of image * (1 - mask) (masked
          pixels at 0, mid-grey) then the packed mask;
      control_pixels -> channels (B, L_img, 64): the control image's latents.
    Latents are the VAE posterior's mean (`encode_packed`).
    """
    out = {}
    if "ref_pixels" in inputs:
        out["ref_img"] = jnp.concatenate([packed_latents(model, params, p) for p in inputs["ref_pixels"]], axis=1)
        out["ref_ids"] = inputs["ref_ids"]
    if "fill_pixels" in inputs:
        mask = inputs["fill_mask"]
        masked = packed_latents(model, params, inputs["fill_pixels"] * (1.0 - mask[..., None]))
        out["channels"] = jnp.concatenate([masked, pack_mask(mask)], axis=-1)
    if "control_pixels" in inputs:
        out["channels"] = packed_latents(model, params, inputs["control_pixels"])
    return out
