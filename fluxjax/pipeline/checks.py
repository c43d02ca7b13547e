"""The checks of a generation call's arguments and the host inputs they become: prompts or
embeddings (and their negative side for true CFG), seeds and noise, the output size, the
img2img / inpainting images and masks, Kontext's size. Everything here runs on the host before
any model does, so a bad argument is one UsageError before any heavy work.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from fluxjax.config import FluxConfig
from fluxjax.errors import UsageError
from fluxjax.pipeline import conditioning
from fluxjax.pipeline.defaults import Defaults
from fluxjax.pipeline.text import PromptTokenizer, check_prompt
from fluxjax.sampling import sampler as sampling


class OutOfGrammarWarning(UserWarning):
    """A prompt the shapes model was not trained on (outside fluxjax.shapes.dataset.GRAMMAR): it still
    generates, but the image need not show the prompt."""


@dataclass(frozen=True)
class CheckedRequest:
    """One call of FluxPipeline, checked: what its stages need.

    batch: B images; height, width: their pixels. start: the index in `sigmas` the loop starts
    from (img2img skips the first steps), steps: the number it runs. sigmas: the schedule,
    (N + 1,) float32 from 1 (or a given first sigma) down to 0. inputs: the host arrays, by name
    (the keys FluxPipeline.prepare reads): noise (B, seq, 64) float32, img_ids (B, seq, 3),
    txt_ids (B, L, 3), guidance (B,) float32 or None, text ({"t5", "clip"} token ids or {"txt",
    "vec"} embeddings), and where they apply true_cfg (B,) with negative (as text), pixels
    (B, H, W, 3) in [-1, 1] with mask (B, seq, 1), variant (the Fill, control or Kontext inputs),
    lora_scales (B, n). output, progress: as given to the call.
    """

    batch: int
    height: int
    width: int
    start: int
    steps: int
    sigmas: np.ndarray
    inputs: dict
    output: str
    progress: bool


@dataclass(frozen=True)
class TextInputs:
    """One side of the conditioning text (the prompt, or the negative prompt): strings or embeddings.

    prompts: the CLIP prompts (None with embeddings); prompts_2: the T5 prompts (diffusers'
    prompt_2; None: the same as prompts); embeds: (txt (B, L, D), vec (B, vec_dim)) float32 or None.
    """

    prompts: list[str] | None
    prompts_2: list[str] | None
    embeds: tuple[np.ndarray, np.ndarray] | None
    batch: int | None

    @property
    def given(self) -> bool:
        return self.prompts is not None or self.embeds is not None

    @classmethod
    def check(cls, prompt, prompt_2, embeds, pooled, name: str, batch: int | None = None) -> "TextInputs":
        """Check one side's arguments (name: "prompt" or "negative_prompt"); batch: the images' count,
        to which a single negative string is stretched (None for the prompt itself)."""
        if (embeds is None) != (pooled is None):
            raise UsageError(f"{name}_embeds and pooled_{name}_embeds go together (T5 and pooled CLIP embeddings)")
        if embeds is not None:
            if prompt is not None or prompt_2 is not None:
                raise UsageError(f"give {name} (and {name}_2) or {name}_embeds, not both")
            txt, vec = np.asarray(embeds, np.float32), np.asarray(pooled, np.float32)
            if txt.ndim != 3 or vec.ndim != 2 or txt.shape[0] != vec.shape[0]:
                raise UsageError(f"{name}_embeds must be (B, L, D) and pooled_{name}_embeds (B, D'), got "
                                 f"{txt.shape} and {vec.shape}")
            if batch is not None and txt.shape[0] != batch:
                raise UsageError(f"{name}_embeds hold {txt.shape[0]} prompts for {batch} images")
            return cls(None, None, (txt, vec), txt.shape[0])
        if prompt is None:
            if prompt_2 is not None:
                raise UsageError(f"{name}_2 needs {name} (the CLIP prompt) too")
            return cls(None, None, None, None)
        if batch is None:  # the prompt itself: checked and counted by prompts_and_noise
            prompts_2 = None if prompt_2 is None else prompt_list(f"{name}_2", prompt_2, 1 if isinstance(prompt, str)
                                                                  else len(prompt))
            return cls(None, prompts_2, None, None)
        prompts = prompt_list(name, prompt, batch)
        return cls(prompts, None if prompt_2 is None else prompt_list(f"{name}_2", prompt_2, batch), None, batch)

    def inputs(self, tokenizer: PromptTokenizer, prompts, max_sequence_length: int, config: FluxConfig,
               length: int | None = None) -> dict:
        """The host arrays the pipeline encodes: {"t5", "clip"} token ids, or {"txt", "vec"} embeddings
        checked against the transformer's widths (and against `length` text tokens when given)."""
        if self.embeds is not None:
            txt, vec = self.embeds
            if txt.shape[2] != config.context_in_dim or vec.shape[1] != config.vec_in_dim:
                raise UsageError(f"embeddings of widths {txt.shape[2]} and {vec.shape[1]}; this transformer takes "
                                 f"{config.context_in_dim} (T5) and {config.vec_in_dim} (pooled CLIP)")
            if length is not None and txt.shape[1] != length:
                raise UsageError(f"negative_prompt_embeds have {txt.shape[1]} tokens, the prompt's {length}: "
                                 "both sides need one length")
            return {"txt": txt, "vec": vec}
        prompts_2 = self.prompts_2
        if prompts_2 is not None and len(prompts_2) != len(prompts):  # a single prompt_2 stretched with the prompt
            prompts_2 = prompts_2 * len(prompts) if len(prompts_2) == 1 else prompts_2
            if len(prompts_2) != len(prompts):
                raise UsageError(f"{len(self.prompts_2)} T5 prompts (prompt_2) for {len(prompts)} prompts")
        if prompts_2 is None:
            t5, clip = tokenizer(prompts, max_sequence_length)
        else:
            t5, clip = tokenizer.tokenize_t5(prompts_2, max_sequence_length), tokenizer.tokenize_clip(prompts)
        if length is not None and t5.shape[1] != length:
            raise UsageError(f"negative prompts encode to {t5.shape[1]} tokens, prompt_embeds hold {length}: give "
                             "negative_prompt_embeds, or max_sequence_length equal to their length")
        return {"t5": t5, "clip": clip}


def true_cfg(scale, negative_given: bool, batch: int) -> np.ndarray | None:
    """(B,) float32 true-CFG scales, or None without a negative prompt; UsageError for a half-given pair."""
    if scale is None:
        if negative_given:
            raise UsageError("negative_prompt needs true_cfg_scale (> 1) to have an effect")
        return None
    if not negative_given:
        raise UsageError("true_cfg_scale needs a negative_prompt (or negative_prompt_embeds)")
    values = np.atleast_1d(np.asarray(scale, dtype=object))
    if values.ndim != 1 or len(values) not in (1, batch) or not all(
            isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and np.isfinite(v) and v > 1 for v in values):
        raise UsageError(f"true_cfg_scale must be a number > 1 or a list of {batch} of them, got {scale!r}")
    return np.broadcast_to(values.astype(np.float32), (batch,)).copy()


def per_image(items: list[np.ndarray], batch: int, name: str) -> np.ndarray:
    """(B, ...) stacked from one item (used for every image) or B of them."""
    if len(items) == 1:
        return np.repeat(items[0][None], batch, axis=0)
    if len(items) != batch:
        raise UsageError(f"{len(items)} {name}s for {batch} images (give one, or one per image)")
    return np.stack(items)


def prompt_list(name: str, prompt, batch: int) -> list[str]:
    """`prompt` (a string, used for every image, or a list of `batch` strings) as a checked list."""
    prompts = [prompt] * batch if isinstance(prompt, str) else list(prompt)
    if len(prompts) != batch:
        raise UsageError(f"{name}: {len(prompts)} prompts for {batch} images")
    for i, p in enumerate(prompts):
        check_prompt(name if isinstance(prompt, str) else f"{name} {i}", p)
    return prompts


def seeds(seed, batch: int) -> list[int]:
    """B checked seeds: `seed` is an int s (image i uses s + i) or a list of B ints."""
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        values = [int(seed) + i for i in range(batch)]
    else:
        values = list(seed)
        if len(values) != batch or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in values):
            raise UsageError(f"seed must be an int or a list of {batch} ints, got {seed!r}")
    for s in values:
        sampling.check_seed("seed", int(s))
    return [int(s) for s in values]


def check_grammar(grammar, name: str, prompts: list[str], stacklevel: int) -> None:
    """An OutOfGrammarWarning (one line, giving the grammar) per distinct prompt that `grammar`
    (None: any prompt) refuses, at `stacklevel` above the caller; the prompt still generates."""
    if grammar is None:
        return
    for prompt in dict.fromkeys(prompts):
        try:
            grammar(prompt)
        except ValueError as e:
            warnings.warn(f"{name} was trained on one grammar only, so the image may not show this prompt: {e}",
                          OutOfGrammarWarning, stacklevel=stacklevel + 1)


def condition_images(image, strength, mask_image, resize):
    """None, or (list of 1 or B uint8 (H, W, 3) images of one size, list of masks or None), checked."""
    if image is None:
        for name, value in (("strength", strength), ("mask_image", mask_image), ("resize", resize)):
            if value is not None:
                raise UsageError(f"{name} needs an image= to start from (img2img or inpainting)")
        return None
    if strength is not None:
        conditioning.strength_start(1, strength)  # the range check, before any image is read
    given = list(image) if isinstance(image, (list, tuple)) else [image]
    names = ["image"] if len(given) == 1 else [f"image {i}" for i in range(len(given))]
    pixels = conditioning.load_images(image, resize, "image")
    masks = None
    if mask_image is not None:  # masks are brought to their image's size as given (read only then)
        sizes = [conditioning.original_size(im, n) for im, n in zip(given, names)]
        masks = list(mask_image) if isinstance(mask_image, (list, tuple)) else [mask_image]
        if len(masks) not in (1, len(given)) and len(given) != 1:
            raise UsageError(f"{len(masks)} mask_images for {len(given)} images (give one, or one per image)")
        masks = [conditioning.load_mask(m, sizes[min(i, len(sizes) - 1)], resize,
                                        "mask_image" if len(masks) == 1 else f"mask_image {i}")
                 for i, m in enumerate(masks)]
    return pixels, masks


def kontext_size(defaults: Defaults, height, width, latents, max_area):
    """(height, width) of a call with reference images: the requested size (default the
    model's) at max_area pixels, as FluxKontextPipeline sets it; with `latents`, their size,
    which must be that size already (None, None then: `prompts_and_noise` reads it)."""
    area = conditioning.KONTEXT_MAX_AREA if max_area is None else max_area
    if latents is None:
        return conditioning.kontext_output_size(height or defaults.height, width or defaults.width, area)
    if np.ndim(latents) == 4:
        size = (np.shape(latents)[2] * 8, np.shape(latents)[3] * 8)
        h, w = conditioning.kontext_output_size(*size, area)
        if (h, w) != size:
            raise UsageError(f"latents are for {size[1]}x{size[0]} images, but with reference_images the output "
                             f"is {w}x{h} (max_area={area}); pass max_area={size[0] * size[1]} or latents of that size")
    return height, width


def prompts_and_noise(defaults: Defaults, prompt, height, width, seed, latents, embeds_batch=None, image=None):
    """(prompts or None, B, noise (B, 16, H/8, W/8) float32, height, width), checked.

    B: the prompts' count (one string prompt is stretched to the batch of `latents`), or
    `embeds_batch` when the prompt comes as embeddings. image: the first conditioning image
    (uint8 (H, W, 3)), whose size the output takes. A size not given is `defaults`'.
    """
    if embeds_batch is None:
        prompts = [] if prompt is None else [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise UsageError("no prompt given")
        for i, p in enumerate(prompts):
            check_prompt("prompt" if isinstance(prompt, str) else f"prompt {i}", p)
        batch, stretch = len(prompts), isinstance(prompt, str)
    else:
        prompts, batch, stretch = None, embeds_batch, False
    if image is not None:
        size = image.shape[:2]
        if (height, width) != (None, None) and (height or size[0], width or size[1]) != size:
            raise UsageError(f"image is {size[1]}x{size[0]}, not height={height}, width={width}: leave height and "
                             "width unset (the output has the image's size)")
        height, width = size
    if latents is not None:
        latents = np.asarray(latents, np.float32) if not isinstance(latents, jax.Array) else latents
        if not bool(jnp.isfinite(latents).all()):
            raise UsageError("latents hold NaN or infinite values")
        if latents.ndim != 4 or latents.shape[1] != sampling.LATENT_CHANNELS:
            raise UsageError(f"latents must have shape (B, 16, H/8, W/8), got {tuple(latents.shape)}")
        size = (latents.shape[2] * 8, latents.shape[3] * 8)
        if (height, width) != (None, None) and (height or size[0], width or size[1]) != size:
            raise UsageError(f"latents of shape {tuple(latents.shape)} are for {size[0]}x{size[1]} images, "
                             f"not height={height}, width={width}")
        height, width = size
        if stretch:
            prompts, batch = prompts * latents.shape[0], latents.shape[0]
        if batch != latents.shape[0]:
            raise UsageError(f"{batch} prompts but latents for {latents.shape[0]} images")
    height = defaults.height if height is None else height
    width = defaults.width if width is None else width
    sampling.check_size(height, width)
    if latents is None:
        latents = sampling.noise(seeds(seed, batch), height, width)
    return prompts, batch, jnp.asarray(latents, jnp.float32), height, width
