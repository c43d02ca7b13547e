"""Flux2Pipeline: FLUX.2 text to image (and reference images), as diffusers' Flux2KleinPipeline
([klein]) and Flux2Pipeline (FLUX.2 [dev]) do; the two differ only in the settings of `Family`.

prompt -> chat template and tokens (host; klein: Qwen3's, qwen3_tokenizer.tokenize; dev: Mistral's with
BFL's system message, mistral_tokenizer.tokenize) -> the hidden states of layers (9, 18, 27) of Qwen3 or
(10, 20, 30) of Mistral side by side (jitted, models.qwen3.encode_prompts) -> the sampler's Euler loop
(sampling.denoise, with no pooled vector, 4 id columns) -> denormalised, unpatchified latents
(models.latents2) -> the FLUX.2 VAE's decoder.

Positions (4 id columns, diffusers' `_prepare_*_ids`): text token j is (0, 0, 0, j); image token
(row, col) is (0, row, col, 0); the tokens of reference image i are (10 + 10 i, row, col, 0) on its
own grid, appended after the image tokens at every step (their velocity is dropped).

Defaults as diffusers uses the checkpoints: a distilled klein (model_index.json `is_distilled`) 4
steps without guidance; a base klein 50 steps with true classifier-free guidance at scale 4 against
the empty prompt (diffusers' `guidance_scale`, here `true_cfg_scale` and `negative_prompt`); FLUX.2
[dev] 50 steps with the embedded guidance 4 (diffusers' `guidance_scale`, here `guidance`, as
FLUX.1 [dev]) and no CFG; 512 text tokens; 1024 x 1024 (or the first reference image's size).

Inpainting (klein, `mask_image=`, as Flux2KleinInpaintPipeline; inputs from flux2_inpaint.py): the
image's tokens are the first reference and the known region is blended in after every step
(sampling.Conditioning image_latents/noise/mask), from the step `strength` cuts the schedule at.
The model's defaults stay (a distilled klein 4 steps, a base klein CFG 4), not that pipeline's
call defaults (50 steps, guidance_scale 8); strength defaults to its 0.8.

img2img (`image=` with `strength=` and no mask; diffusers has no FLUX.2 img2img pipeline): as
FluxPipeline's, the loop starts from the image's tokens noised to the first sigma of the schedule
`strength` cuts (sampling.Conditioning start); the image is prepared as inpainting's and is no
reference. At strength 1 the start is the noise itself: the text-to-image result.

A Flux2KleinKVPipeline folder (klein with cached references) runs here too: flux2_kv.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fluxjax.errors import UsageError
from fluxjax.loading.mistral import load_mistral
from fluxjax.loading.qwen3 import load_qwen3
from fluxjax.loading.registry import load_transformer, load_vae
from fluxjax.models import latents2
from fluxjax.models.qwen3 import FLUX2_DEV_LAYERS, KLEIN_LAYERS, check_layers, encode_prompts
from fluxjax.parallel.strategies import Strategy, jit_with_rules, placed
from fluxjax.pipeline import checks, mistral_tokenizer, qwen3_tokenizer, sources
from fluxjax.pipeline.components import Component
from fluxjax.pipeline.conditioning import strength_start
from fluxjax.pipeline.outputs import check_output, gather, to_uint8
from fluxjax.pipeline.flux2_inpaint import INPAINT_STRENGTH, image_pixels, inpaint_inputs, mask_tokens
from fluxjax.pipeline.flux2_kv import KV_REFERENCE_TIME
from fluxjax.pipeline.lora_state import LoraMixin, LoraState
# FLUX.2's token layout (flux2_tokens.py, shared with FlowEdit's flux2_edit.py)
from fluxjax.pipeline.flux2_tokens import decode_tokens, encode_tokens, position_ids, text_ids
from fluxjax.pipeline.qwen3_tokenizer import KLEIN_MAX_SEQUENCE_LENGTH
from fluxjax.pipeline.text import check_prompt
from fluxjax.sampling import sampler as sampling

KLEIN_PIPELINE = "Flux2KleinPipeline"  # model_index.json's _class_name of the klein checkpoints
KLEIN_KV_PIPELINE = "Flux2KleinKVPipeline"  # klein with cached references (flux2_kv.py)
DEV_PIPELINE = "Flux2Pipeline"  # FLUX.2 [dev]'s (Mistral text encoder, guidance embedding)
PIPELINE_CLASSES = (KLEIN_PIPELINE, KLEIN_KV_PIPELINE, DEV_PIPELINE)
FOLDERS = ("transformer", "text_encoder", "tokenizer", "vae", "scheduler")
REFERENCE_TIME = 10  # reference image i sits at time coordinate 10 + 10 i (diffusers' `scale`)
REFERENCE_MAX_AREA = 1024 * 1024  # larger references are scaled down to this many pixels
REFERENCE_MIN_SIDE, REFERENCE_MAX_ASPECT = 64, 8  # diffusers' Flux2ImageProcessor.check_image_input
# FluxPipeline.from_pretrained's options a FLUX.2 folder leaves at these values (FLUX.1's for now).
LOAD_DEFAULTS = dict(transformer=None, vae=None, variant=None, quantize=None)
# The request options (fluxjax/pipeline/request.py's names) and loading options a FLUX.2 pipeline
# does not take: `check_options` refuses them before loading. (resize: an inpainted image is
# resized as diffusers' Flux2KleinInpaintPipeline does, flux2_inpaint.inpaint_inputs.)
NOT_TAKEN = ("prompt_2", "control", "resize", "transformer", "vae", "quantize")


@dataclass(frozen=True)
class KleinDefaults:
    """What `pipe(...)` uses for an argument left at None."""

    num_steps: int
    true_cfg_scale: float | None  # None: no CFG (distilled klein, FLUX.2 [dev])
    max_sequence_length: int = KLEIN_MAX_SEQUENCE_LENGTH
    height: int = 1024
    width: int = 1024
    guidance: float | None = None  # the embedded guidance (FLUX.2 [dev]); None: no guidance embedding


DISTILLED = KleinDefaults(num_steps=4, true_cfg_scale=None)
BASE = KleinDefaults(num_steps=50, true_cfg_scale=4.0)  # diffusers' num_inference_steps and guidance_scale
# Flux2Pipeline's num_inference_steps, guidance_scale (embedded) and max_sequence_length
DEV = KleinDefaults(num_steps=50, true_cfg_scale=None, guidance=4.0,
                    max_sequence_length=mistral_tokenizer.FLUX2_DEV_MAX_SEQUENCE_LENGTH)


@dataclass(frozen=True)
class Family:
    """What a FLUX.2 pipeline class changes: its text encoder (loader, tokenizer, stacked layers)
    and whether the transformer embeds a guidance value."""

    pipeline_class: str  # model_index.json's _class_name
    encoder: str  # the text encoder's name in messages
    load_text_encoder: Any  # folder, dtype -> (model, params)
    tokenize: Any  # (tokenizer, prompts, max_sequence_length) -> (ids, mask) int32 (B, L)
    layers: tuple[int, ...]  # the hidden states stacked (diffusers' text_encoder_out_layers default)
    guidance_embed: bool
    # None: reference tokens are in the sequence at every step; a time: they are cached (flux2_kv.py)
    reference_time: float | None = None


KLEIN = Family(KLEIN_PIPELINE, "Qwen3", load_qwen3, qwen3_tokenizer.tokenize, KLEIN_LAYERS, False)
KLEIN_KV = dataclasses.replace(KLEIN, pipeline_class=KLEIN_KV_PIPELINE, reference_time=KV_REFERENCE_TIME)
FLUX2_DEV = Family(DEV_PIPELINE, "Mistral", load_mistral, mistral_tokenizer.tokenize, FLUX2_DEV_LAYERS, True)
FAMILIES = {f.pipeline_class: f for f in (KLEIN, KLEIN_KV, FLUX2_DEV)}


def family_defaults(family: Family, is_distilled: bool) -> KleinDefaults:
    """What a pipeline of `family` (a distilled klein or not) defaults to."""
    return DEV if family.guidance_embed else DISTILLED if is_distilled else BASE


def folder_is_distilled(index: dict, family: Family) -> bool:
    """Whether a folder of `family` with model_index.json `index` runs as a distilled klein. A
    Flux2KleinKVPipeline always does: it has no negative pass, defaults to 4 steps and does not
    write is_distilled."""
    return family.reference_time is not None or bool(index.get("is_distilled", False))


def reference_pixels(image, name: str = "image") -> np.ndarray:
    """A reference image as diffusers' Flux2KleinPipeline prepares it: uint8 (h, w, 3), scaled
    (Lanczos) to about 1024**2 pixels when larger, then centre-cropped to multiples of 16.

    image: a path, a PIL image or a uint8 array (H, W, 3). UsageError naming `name` for a side
    under 64 pixels or an aspect ratio over 8 (diffusers' checks).
    """
    from PIL import Image

    from fluxjax.images import read_image, rgb8

    if isinstance(image, (str, os.PathLike)):
        image, name = read_image(image, name), f"{name} {os.fspath(image)}"
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise UsageError(f"{name}: expected a uint8 RGB array (H, W, 3), got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    elif not isinstance(image, Image.Image):
        raise UsageError(f"{name}: expected a path, a PIL image or a uint8 array, got {type(image).__name__}")
    width, height = image.size
    if min(width, height) < REFERENCE_MIN_SIDE:
        raise UsageError(f"{name} is {width}x{height}: both sides must be at least {REFERENCE_MIN_SIDE} pixels")
    if max(width / height, height / width) > REFERENCE_MAX_ASPECT:
        raise UsageError(f"{name} is {width}x{height}: the aspect ratio may be at most {REFERENCE_MAX_ASPECT}:1")
    if width * height > REFERENCE_MAX_AREA:
        scale = (REFERENCE_MAX_AREA / (width * height)) ** 0.5
        image = image.resize((int(width * scale), int(height * scale)), Image.Resampling.LANCZOS)
        width, height = image.size
    step = sampling.PIXELS_PER_TOKEN
    w, h = width // step * step, height // step * step
    left, top = (width - w) // 2, (height - h) // 2
    return np.asarray(rgb8(image.crop((left, top, left + w, top + h))))


def reference_ids(sizes: Sequence[tuple[int, int]], batch: int) -> np.ndarray:
    """(B, L_ref, 4) float32 ids of references of `sizes` [(h, w) pixels]: reference i's tokens
    (10 + 10 i, row, col, 0), references in order."""
    step = sampling.PIXELS_PER_TOKEN
    return np.concatenate([position_ids(batch, h // step, w // step, REFERENCE_TIME * (i + 1))
                           for i, (h, w) in enumerate(sizes)], axis=1)


encode_text = jit_with_rules(encode_prompts, static_argnames=("model", "layers", "dtype"))
"""models.qwen3.encode_prompts compiled once per encoder, token length, layers and strategy."""


def pipeline_index(root: str) -> dict:
    """model_index.json of a pipeline folder ({} without one); UsageError when it is not JSON."""
    path = os.path.join(root, "model_index.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise UsageError(f"{path}: not a JSON file ({e})") from None


class Flux2Pipeline(LoraMixin):
    """FLUX.2 text to image: [klein] or [dev] (`family`). Build with `Flux2Pipeline.from_pretrained(folder)`
    (or `FluxPipeline.from_pretrained`, which comes here for a Flux2KleinPipeline or Flux2Pipeline
    folder), call with a prompt.

    Attributes: transformer, text_encoder, vae (Components), tokenizer (transformers' Qwen2
    tokenizer; for [dev] Mistral's tokenizer or processor), schedule (sampling.Flux2Schedule),
    is_distilled (klein), family (Family), defaults (KleinDefaults), name, strategy and mesh (the
    sharding strategy and its mesh, None on one device, as FluxPipeline's), timings (seconds of
    each stage of the last call: encode, denoise, decode), lora_state (the LoRAs: load_lora,
    unload_lora, loras and adapters as FluxPipeline's, fluxjax/pipeline/lora_state.py).
    """

    def __init__(self, transformer: Component, text_encoder: Component, tokenizer, vae: Component,
                 schedule: sampling.Schedule, is_distilled: bool, name: str, family: Family = KLEIN,
                 strategy: Strategy | None = None, mesh: jax.sharding.Mesh | None = None):
        t, q, v = transformer.model.config, text_encoder.model.config, vae.model.config
        problems = []
        if t.vec_in_dim or t.id_columns != 4:
            problems.append("the transformer is not a FLUX.2 one")
        if t.guidance_embed and not family.guidance_embed:
            problems.append("the transformer has a guidance embedding (FLUX.2 [dev]); klein has none")
        if family.guidance_embed and not t.guidance_embed:
            problems.append("the transformer has no guidance embedding; FLUX.2 [dev]'s has one")
        if q.family != family.encoder:
            problems.append(f"the text encoder is a {q.family}, {family.pipeline_class} takes a {family.encoder}")
        if t.context_in_dim != len(family.layers) * q.hidden_size:
            problems.append(f"transformer context_in_dim {t.context_in_dim} != {len(family.layers)} x {family.encoder} "
                            f"hidden_size {q.hidden_size}")
        if v.batch_norm_eps is None or t.in_channels != 4 * v.z_channels or t.out_channels != 4 * v.z_channels:
            problems.append(f"transformer in/out channels {t.in_channels}/{t.out_channels} do not fit the FLUX.2 VAE's "
                            f"4 x {v.z_channels}")
        if problems:
            raise UsageError(f"{name}: components do not fit together: " + "; ".join(problems))
        self.transformer, self.text_encoder, self.tokenizer, self.vae = transformer, text_encoder, tokenizer, vae
        self.schedule, self.is_distilled, self.name, self.family = schedule, is_distilled, name, family
        self.strategy, self.mesh = strategy, mesh
        self.defaults = family_defaults(family, is_distilled)
        self.timings: dict[str, float] = {}
        self.lora_state = LoraState()

    # References set the size themselves (the first one's when none is asked), not Kontext's way.
    kontext_references = False
    default_strength = INPAINT_STRENGTH  # inpainting's and img2img's (FLUX.2 has no img2img default of its own)

    @classmethod
    def check_options(cls, root: str, given, name) -> None:
        """Refuse, from `root`'s model_index.json alone (before loading), what its pipeline would
        refuse: the options of NOT_TAKEN, more than one reference with a mask, guidance on klein,
        CFG on distilled klein and [dev].

        given: {option name: value} of the options given (request.py's names, and loading
        options'); name(option) is how a message names one (a CLI flag). UsageError naming the
        first option refused.
        """
        index = pipeline_index(root)
        family = FAMILIES.get(index.get("_class_name"))
        if family is None:
            return  # from_pretrained names the folder's fault
        what = f"{root} is a {family.pipeline_class} folder (FLUX.2)"
        for key in NOT_TAKEN:
            if key in given:
                raise UsageError(f"{name(key)}: {what}, which does not take it yet")
        if "mask" in given and (family.guidance_embed or family.reference_time is not None):
            raise UsageError(f"{name('mask')}: {what}; inpainting is FLUX.2 [klein]'s (Flux2KleinPipeline folders)")
        if "mask" in given and len(given.get("references", ())) > 1:
            raise UsageError(f"{name('references')}: inpainting takes at most one reference image")
        defaults = family_defaults(family, folder_is_distilled(index, family))
        if "guidance" in given and defaults.guidance is None:
            raise UsageError(f"{name('guidance')}: {what} of a klein model (no guidance embedding)"
                             + ("" if defaults.true_cfg_scale is None else f"; its CFG scale is {name('true_cfg')}"))
        for key in ("negative_prompt", "true_cfg"):
            if key in given and defaults.true_cfg_scale is None:
                raise UsageError(f"{name(key)}: {what} without classifier-free guidance (a distilled klein or "
                                 "[dev]); only a base klein takes it")

    def settings(self, num_steps: int | None = None, guidance: float | None = None,
                 max_sequence_length: int | None = None) -> tuple[int, float | None, int]:
        """(num_steps, guidance, max_sequence_length) as a call with these arguments uses them
        (FluxPipeline.settings' interface): None filled in from `defaults`; guidance None for
        klein, which refuses one given (UsageError)."""
        d = self.defaults
        return (d.num_steps if num_steps is None else num_steps, self._guidance(guidance),
                d.max_sequence_length if max_sequence_length is None else max_sequence_length)

    def _takes_control_lora(self) -> bool:
        return False  # structural-control LoRAs are FLUX.1's: FLUX.2 conditions on reference tokens

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, dtype="bfloat16", attention_impl: str = "auto",
                        sharding=None, devices=None, loras=(), fuse: bool = True, **unsupported) -> "Flux2Pipeline":
        """Load a diffusers Flux2KleinPipeline folder (model_index.json, transformer/,
        text_encoder/ (Qwen3ForCausalLM), tokenizer/, vae/ (AutoencoderKLFlux2), scheduler/) or a
        Flux2Pipeline one (FLUX.2 [dev]: text_encoder/ Mistral3ForConditionalGeneration, tokenizer/
        Mistral's processor or tokenizer, a transformer with a guidance embedding), or a
        Flux2KleinKVPipeline one (flux2_kv.py); or a hub repo id of one ("org/name":
        sources.resolve_source, the local hub cache's snapshot, else a download).

        dtype: parameters and compute of every model ("bfloat16" or "float32").
        attention_impl: the transformer's (see FluxPipeline.from_pretrained).
        sharding, devices: as FluxPipeline.from_pretrained's: a strategy of fluxjax/configs/sharding
            (any, the sp_* ones included), a strategy file or a Strategy, over `devices` (default all);
            the transformer and the text encoder are read straight into their shards as its tables
            say, the VAE too (no strategy splits its convolutions: replicated), and each call's
            batch is split along its data axes (padded, the padding dropped).
        loras, fuse: LoRA files for the transformer (FLUX.2's diffusers, ComfyUI/ai-toolkit and kohya
            layouts, fluxjax/lora/formats.py), applied as `load_lora(loras, fuse=fuse)` does.
        unsupported: FluxPipeline.from_pretrained's other options; each left at its default or
            refused (single files, quantization are FLUX.1's for now).
        """
        for key, value in unsupported.items():
            if key not in LOAD_DEFAULTS:
                raise TypeError(f"Flux2Pipeline.from_pretrained() got an unexpected keyword argument {key!r}")
            if (tuple(value) if isinstance(value, list) else value) != LOAD_DEFAULTS[key]:
                raise UsageError(f"{key}= is not supported for FLUX.2 pipelines yet")
        root = os.fspath(source)
        if not os.path.isdir(root):
            if not sources.is_repo_id(root):
                raise UsageError(f"{root}: no such folder (expected a diffusers Flux2KleinPipeline or Flux2Pipeline "
                                 "folder, or a hub repo id)")
            root = sources.resolve_source(root)  # the local hub cache's snapshot, else a download
        index = pipeline_index(root)
        kind = index.get("_class_name")
        if kind not in FAMILIES:
            raise UsageError(f"{root}/model_index.json: _class_name {kind!r}, expected one of "
                             f"{', '.join(repr(k) for k in FAMILIES)}")
        family = FAMILIES[kind]
        missing = [f for f in FOLDERS if not os.path.isdir(os.path.join(root, f))]
        if missing:
            raise UsageError(f"{root}: not a {kind} folder, missing {', '.join(m + '/' for m in missing)}")
        strategy = mesh = placement = None
        if sharding is not None:
            strategy = sharding if isinstance(sharding, Strategy) else Strategy.load(sharding)
            mesh = strategy.make_mesh(devices)
            placement = strategy.param_shardings(mesh)
        from transformers import AutoTokenizer

        dtype = jnp.dtype(dtype)
        transformer = Component(*load_transformer(os.path.join(root, "transformer"), dtype,
                                                  attention_impl=attention_impl, sharding=placement))
        text_encoder = Component(*family.load_text_encoder(os.path.join(root, "text_encoder"), dtype,
                                                           sharding=placement))
        vae = Component(*load_vae(os.path.join(root, "vae"), dtype, sharding=placement))
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(root, "tokenizer"), local_files_only=True)
        schedule = sampling.Flux2Schedule.from_config(os.path.join(root, "scheduler"))
        pipe = cls(transformer, text_encoder, tokenizer, vae, schedule, folder_is_distilled(index, family),
                   os.path.basename(os.path.normpath(root)), family, strategy, mesh)
        if loras:
            pipe.load_lora(loras, fuse=fuse)
        return pipe

    def __call__(self, prompt: str | Sequence[str], height: int | None = None, width: int | None = None,
                 num_steps: int | None = None, seed: int | Sequence[int] = 0, latents=None,
                 max_sequence_length: int | None = None, output: str = "pil", *, image=None,
                 negative_prompt: str | Sequence[str] | None = None, true_cfg_scale=None, sigmas=None,
                 text_encoder_out_layers: Sequence[int] | None = None, guidance: float | None = None,
                 mask_image=None, strength: float | None = None, image_reference=None, reference_images=None,
                 progress: bool = False, lora_scales=None):
        """Generate one image per prompt.

        prompt: a string or a list of B strings (with `latents`, one string is used B times).
        height, width: pixels, multiples of 16 (default: from `latents`, else the first reference
            image's size, else 1024).
        num_steps, max_sequence_length: default to the model's (distilled: 4; base, dev: 50; 512 tokens).
        seed: an int s (image i uses s + i) or B ints. latents: the initial noise instead, float32
            (B, 128, H/16, W/16) as diffusers' Flux2KleinPipeline takes `latents`.
        output: "np" -> float32 (B, H, W, 3) in [0, 1]; "pil" -> list of PIL images.
        image: reference images (a path, PIL image or uint8 array, or a list of them), shared by
            every image of the call; each is prepared as `reference_pixels` says.
        negative_prompt, true_cfg_scale: base models only: v = v_neg + s (v - v_neg), s >= 1
            (default 4; 1 turns the negative pass off), negative_prompt default "" (diffusers'
            guidance_scale, always against ""). Distilled klein and FLUX.2 [dev] refuse both.
        sigmas: N custom timesteps in (0, 1], decreasing, shifted as diffusers shifts them.
        text_encoder_out_layers: the hidden states stacked (default klein's Qwen3 9, 18, 27; dev's
            Mistral 10, 20, 30).
        guidance: FLUX.2 [dev] only: the embedded guidance value (diffusers' guidance_scale, default 4).
        mask_image, strength, image_reference: klein inpainting as diffusers' Flux2KleinInpaintPipeline
            (flux2_inpaint): `image` (one image, shared by the batch; it sets the output size) is
            repainted where the mask is white, from the step `strength` (default 0.8) cuts the schedule
            at; `latents` (or the seed) is then the noise the image is blended with. image_reference:
            one more reference image after the image itself.
        image, strength without mask_image: img2img (module docstring): `image` (one image; it sets
            the output size) noised to the step `strength` (in (0, 1]) cuts the schedule at; references
            then come as reference_images.
        reference_images: FluxPipeline's spelling (a list): the reference images (`image`), with
            mask_image the one image_reference, with img2img the references.
        progress: show a progress bar over encoding, each step and decoding (on a terminal), as FluxPipeline's.
        lora_scales: strengths of the live LoRAs (see load_lora): one number per LoRA, or a
            (B, n) table, one row per image; default: the strengths they were loaded with.
        """
        img2img = mask_image is None and strength is not None
        references = None
        if reference_images is not None and len(reference_images):
            if mask_image is None and not img2img and image is not None:
                raise UsageError("give reference images as image= or reference_images=, not both")
            if mask_image is not None and (image_reference is not None or len(reference_images) > 1):
                raise UsageError("inpainting takes one reference image (image_reference=)")
            if img2img:
                references = [reference_pixels(im, f"reference_images {i}") for i, im in enumerate(reference_images)]
            elif mask_image is None:
                image = list(reference_images)
            else:
                image_reference = reference_images[0]
        if output not in ("np", "pil"):
            raise UsageError(f"output must be 'np' or 'pil', got {output!r}")
        guidance = self._guidance(guidance)
        layers = check_layers(self.family.layers if text_encoder_out_layers is None else text_encoder_out_layers,
                              self.text_encoder.model.config.num_hidden_layers, self.family.encoder)
        if len(layers) * self.text_encoder.model.config.hidden_size != self.transformer.model.config.context_in_dim:
            raise UsageError(f"text_encoder_out_layers: {len(layers)} layers, the transformer takes "
                             f"{self.transformer.model.config.context_in_dim // self.text_encoder.model.config.hidden_size}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise UsageError("no prompt given")
        for i, p in enumerate(prompts):
            check_prompt("prompt" if isinstance(prompt, str) else f"prompt {i}", p)
        inpaint = start_image = None
        if mask_image is not None:
            if self.family.guidance_embed or self.family.reference_time is not None:
                raise UsageError(f"{self.name}: inpainting (mask_image=) is FLUX.2 [klein]'s (Flux2KleinInpaintPipeline)")
            if image is None or isinstance(image, (list, tuple)):
                raise UsageError("mask_image= needs one image= to inpaint")
            pixels, mask = inpaint_inputs(image, mask_image)
            if (height or pixels.shape[0], width or pixels.shape[1]) != pixels.shape[:2]:
                raise UsageError(f"height={height}, width={width}: an inpainted image keeps the image's size "
                                 f"{pixels.shape[1]}x{pixels.shape[0]} (leave them unset)")
            height, width = pixels.shape[:2]
            references = [pixels] + ([] if image_reference is None else [reference_pixels(image_reference,
                                                                                           "image_reference")])
            strength_start(1, INPAINT_STRENGTH if strength is None else strength)  # the range check, early
            inpaint = mask
        elif image_reference is not None:
            raise UsageError("image_reference= is for inpainting: give mask_image= (and image=)")
        elif img2img:
            if image is None or isinstance(image, (list, tuple)):
                raise UsageError("strength= without mask_image= is img2img: give one image= to start from")
            start_image = image_pixels(image)
            if (height or start_image.shape[0], width or start_image.shape[1]) != start_image.shape[:2]:
                raise UsageError(f"height={height}, width={width}: img2img keeps the image's size "
                                 f"{start_image.shape[1]}x{start_image.shape[0]} (leave them unset)")
            height, width = start_image.shape[:2]
            strength_start(1, strength)  # the range check, early
        elif image is not None:
            given = list(image) if isinstance(image, (list, tuple)) else [image]
            if not given:
                raise UsageError("image: an empty list")
            references = [reference_pixels(im, "image" if len(given) == 1 else f"image {i}") for i, im in enumerate(given)]
            height = height or references[0].shape[0]
            width = width or references[0].shape[1]
        noise, height, width = self._noise(prompts, isinstance(prompt, str), height, width, seed, latents)
        prompts = prompts * noise.shape[0] if len(prompts) == 1 else prompts
        batch = noise.shape[0]
        if sigmas is not None:
            sigmas = sampling.check_sigmas(sigmas)
            if num_steps is not None and num_steps != len(sigmas):
                raise UsageError(f"num_steps {num_steps} but {len(sigmas)} sigmas: leave num_steps unset with sigmas")
            num_steps = len(sigmas)
        d = self.defaults
        num_steps = d.num_steps if num_steps is None else num_steps
        length = d.max_sequence_length if max_sequence_length is None else max_sequence_length
        cfg = self._cfg(true_cfg_scale, negative_prompt, batch)
        lora_table = self.lora_state.scales(lora_scales, batch)
        rows, cols = height // sampling.PIXELS_PER_TOKEN, width // sampling.PIXELS_PER_TOKEN
        schedule = self.schedule.sigmas(num_steps, rows * cols) if sigmas is None else \
            self.schedule.shift_sigmas(sigmas, rows * cols)
        first = 0 if inpaint is None and start_image is None else \
            strength_start(num_steps, INPAINT_STRENGTH if strength is None else strength)

        # Host inputs, every one (B, ...): padded and placed on the mesh together under a strategy.
        ids, mask = self.family.tokenize(self.tokenizer, prompts, length)
        inputs = dict(ids=ids, mask=mask, img=np.asarray(latents2.pack(noise)), img_ids=position_ids(batch, rows, cols),
                      txt_ids=text_ids(batch, ids.shape[1]))
        if guidance is not None:
            inputs["guidance"] = np.full((batch,), guidance, np.float32)
        if lora_table is not None:
            inputs["lora_scales"] = lora_table
        if cfg is not None:
            negatives, inputs["true_cfg"] = cfg
            inputs["neg_ids"], inputs["neg_mask"] = self.family.tokenize(self.tokenizer, negatives, length)
        if references is not None:  # shared by the batch, repeated per image as FLUX.1's Kontext references
            inputs["ref_pixels"] = tuple(np.broadcast_to(r.astype(np.float32) / 127.5 - 1.0, (batch,) + r.shape)
                                         for r in references)
            inputs["ref_ids"] = reference_ids([r.shape[:2] for r in references], batch)
            if self.family.reference_time is not None:  # cached references (flux2_kv.py)
                inputs["ref_time"] = np.full((batch,), self.family.reference_time, np.float32)
        if inpaint is not None:
            inputs["mask_tokens"] = mask_tokens(inpaint, batch, inputs["img"].shape[-1])
        if start_image is not None:
            inputs["start_pixels"] = np.broadcast_to(start_image.astype(np.float32) / 127.5 - 1.0,
                                                     (batch,) + start_image.shape)
        inputs, context = placed(self.strategy, self.mesh, inputs)
        from tqdm import tqdm

        # As FluxPipeline's: one unit for encoding, one per step (the loop's host callback), one for decoding.
        with context, tqdm(total=num_steps - first + 2, desc="encoding prompt", unit="stage",
                           disable=not progress or None, leave=False) as bar:
            out = self._run(inputs, layers, schedule, first, bar if progress else None)
            if not progress:
                bar.update(num_steps - first + 1)
            bar.set_description("decoding")
            start = time.perf_counter()
            # Checked before decoding: the decoder clips, so an infinite latent would decode finite.
            check_output(gather(out)[:batch], "the denoised latents of images")
            images = gather(decode_tokens(self.vae.model, self.vae.params, out, rows, cols))[:batch]
            self.timings["decode"] = time.perf_counter() - start
            bar.update(1)
        if output == "np":
            return images
        from PIL import Image

        return [Image.fromarray(u8) for u8 in to_uint8(images)]

    def _run(self, inputs: dict, layers: tuple[int, ...], schedule: np.ndarray, first: int, bar=None) -> jax.Array:
        """The device stages of a call (encode, denoise) on `inputs` as `__call__` builds them (placed
        under a strategy): the denoised tokens (B', L_img, 128) float32. first: the first step of
        inpainting (with mask_tokens: the image's tokens are the first reference's and the known
        region) or img2img (with start_pixels); 0 otherwise. bar: a tqdm bar advanced once after
        encoding and once per step (the loop's host callback), or None."""
        start = time.perf_counter()
        txt = self._embed(inputs["ids"], inputs["mask"], layers)
        cond = {}
        if "true_cfg" in inputs:
            cond.update(neg_txt=self._embed(inputs["neg_ids"], inputs["neg_mask"], layers), true_cfg=inputs["true_cfg"])
        img = inputs["img"]
        if "ref_pixels" in inputs:
            tokens = [encode_tokens(self.vae.model, self.vae.params, r) for r in inputs["ref_pixels"]]
            cond.update(ref_img=jnp.concatenate(tokens, axis=1), ref_ids=inputs["ref_ids"])
            if "ref_time" in inputs:  # cached references: their keys and values once, before the first step
                cond.update(ref_time=inputs["ref_time"])
            if "mask_tokens" in inputs:
                cond.update(start=np.int32(first), image_latents=tokens[0], noise=img, mask=inputs["mask_tokens"])
                img = sampling.scale_noise(tokens[0], img, schedule[first])
        if "start_pixels" in inputs:
            cond["start"] = np.int32(first)
            img = sampling.scale_noise(encode_tokens(self.vae.model, self.vae.params, inputs["start_pixels"]), img,
                                       schedule[first])
        txt.block_until_ready()
        self.timings = {"encode": time.perf_counter() - start}
        if bar is not None:
            bar.update(1)
            bar.set_description(f"denoising ({len(schedule) - 1 - first} steps)")

        start = time.perf_counter()
        with sampling.step_callback(lambda i: bar.update(1)) as on_step:
            out = sampling.denoise(self.transformer.model, self.transformer.params, img, inputs["img_ids"], txt,
                                   inputs["txt_ids"], None, schedule, inputs.get("guidance"),
                                   on_step=None if bar is None else on_step,
                                   adapters=None if self.adapters is None else self.adapters.tree,
                                   lora_scales=inputs.get("lora_scales"),
                                   cond=sampling.Conditioning(**cond) if cond else None)
            out.block_until_ready()  # inside: the step callbacks run while the loop does
        self.timings["denoise"] = time.perf_counter() - start
        return out

    def edit(self, image, source_prompt: str | Sequence[str], target_prompt: str | Sequence[str], **options):
        """FlowEdit of real images on a distilled klein or FLUX.2 [dev]: flux2_edit.edit (its arguments)."""
        from fluxjax.pipeline.flux2_edit import edit

        return edit(self, image, source_prompt, target_prompt, **options)

    def encode(self, prompts: Sequence[str], max_sequence_length: int, layers: Sequence[int] | None = None):
        """Prompts -> prompt_embeds (B, max_sequence_length, K * hidden) in the transformer's dtype
        (on one device; a call under a strategy encodes its placed tokens)."""
        layers = self.family.layers if layers is None else layers
        ids, mask = self.family.tokenize(self.tokenizer, list(prompts), max_sequence_length)
        return self._embed(ids, mask, layers)

    def _embed(self, ids, mask, layers: Sequence[int]):
        """Token ids and mask (B, L) -> prompt_embeds (B, L, K * hidden) in the transformer's dtype."""
        return encode_text(self.text_encoder.model, self.text_encoder.params, ids, mask, tuple(layers),
                           self.transformer.model.dtype)

    def _noise(self, prompts, stretch, height, width, seed, latents):
        """(noise (B, 128, H/16, W/16) float32, height, width), checked against the prompts."""
        channels = self.transformer.model.config.in_channels
        step = sampling.PIXELS_PER_TOKEN
        if latents is not None:
            latents = np.asarray(latents, np.float32)
            if latents.ndim != 4 or latents.shape[1] != channels:
                raise UsageError(f"latents must have shape (B, {channels}, H/16, W/16), got {latents.shape}")
            if not np.isfinite(latents).all():
                raise UsageError("latents hold NaN or infinite values")
            size = (latents.shape[2] * step, latents.shape[3] * step)
            if (height or size[0], width or size[1]) != size:
                raise UsageError(f"latents of shape {latents.shape} are for {size[1]}x{size[0]} images, "
                                 f"not height={height}, width={width}")
            if latents.shape[0] != len(prompts) and not stretch:
                raise UsageError(f"{len(prompts)} prompts but latents for {latents.shape[0]} images")
            return jnp.asarray(latents), size[0], size[1]
        height = self.defaults.height if height is None else height
        width = self.defaults.width if width is None else width
        sampling.check_size(height, width)
        batch = len(prompts)
        return sampling.seeded_normal(checks.seeds(seed, batch), (channels, height // step, width // step)), height, width

    def _guidance(self, guidance):
        """The embedded guidance value of the call (FLUX.2 [dev]), None for klein (which refuses one)."""
        if not self.family.guidance_embed:
            if guidance is not None:
                raise UsageError(f"{self.name} is a klein model (no guidance embedding): leave guidance unset"
                                 + ("" if self.is_distilled else "; its CFG scale is true_cfg_scale"))
            return None
        guidance = self.defaults.guidance if guidance is None else guidance
        if not isinstance(guidance, (int, float, np.number)) or isinstance(guidance, bool) or not np.isfinite(guidance):
            raise UsageError(f"guidance must be a finite number, got {guidance!r}")
        return float(guidance)

    def _cfg(self, scale, negative_prompt, batch: int):
        """None (no negative pass), or (B negative prompts, (B,) float32 scales)."""
        if self.family.guidance_embed:  # diffusers' Flux2Pipeline has no negative pass
            if scale is not None or negative_prompt is not None:
                raise UsageError(f"{self.name} is FLUX.2 [dev] (embedded guidance, no CFG): leave true_cfg_scale and "
                                 "negative_prompt unset; its guidance value is guidance=")
            return None
        if self.is_distilled:
            if scale is not None or negative_prompt is not None:
                raise UsageError(f"{self.name} is a distilled klein model (no CFG): leave true_cfg_scale and "
                                 "negative_prompt unset")
            return None
        scale = self.defaults.true_cfg_scale if scale is None else scale
        values = np.atleast_1d(np.asarray(scale, dtype=object))
        if values.ndim != 1 or len(values) not in (1, batch) or not all(
                isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and np.isfinite(v) and v >= 1
                for v in values):
            raise UsageError(f"true_cfg_scale must be a number >= 1 or a list of {batch} of them, got {scale!r}")
        if (values == 1).all():  # as diffusers' guidance_scale <= 1: one transformer call per step
            return None
        negatives = "" if negative_prompt is None else negative_prompt
        negatives = [negatives] * batch if isinstance(negatives, str) else list(negatives)
        if len(negatives) != batch:
            raise UsageError(f"negative_prompt: {len(negatives)} prompts for {batch} images")
        for i, p in enumerate(negatives):
            check_prompt(f"negative_prompt {i}", p)
        return negatives, np.broadcast_to(values.astype(np.float32), (batch,)).copy()
