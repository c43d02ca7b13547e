"""FluxPipeline: prompt -> T5 + CLIP -> jitted Euler loop over the transformer -> VAE -> images.

A call runs as named stages, each a method: `check` (every argument checked and made into host
arrays, fluxjax/pipeline/checks.py; no model runs, so a bad argument fails at once),
`encode_prompts` (T5 and CLIP), `prepare` (the starting latents and the conditioning: images
through the VAE encoder), `denoise` (the sampling loop) and `decode` (the VAE decoder, outputs.py).
Beside it: where a model comes from (sources.py), what a call defaults to (defaults.py), the
components and their fit (components.py), the LoRAs it holds (lora_state.py), FlowEdit's `edit`
(editing.py).

Three compiled functions, each compiled once per shape and reused: text encoding (per batch
size and T5 length), denoising (per batch, size and number of steps; latents, text, schedule
and guidance are arguments), decoding (per batch and size). A new seed, prompt or guidance of
a known shape runs without compiling; JAX's persistent cache (fluxjax.runtime) keeps the
executables across processes.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from fluxjax.pipeline import checks, conditioning, residency as residency_rules, sources
from fluxjax.sampling import sampler as sampling
from fluxjax.runtime import enable_compilation_cache
from fluxjax.errors import UsageError
from fluxjax.loading import registry
from fluxjax.loading.checkpoint import device_bytes
from fluxjax.loading.registry import COMPONENTS, load
from fluxjax.models import attention
from fluxjax.models.quantize import check_mode
from fluxjax.parallel.strategies import Strategy, placed
from fluxjax.pipeline.checks import CheckedRequest
from fluxjax.pipeline.components import Component, check_compatible, component_options, tiny_components, tiny_models
from fluxjax.pipeline.defaults import Defaults, kind_defaults, kind_schedule, read_defaults, resolve_settings, with_overrides
from fluxjax.pipeline.editing import EditMixin
from fluxjax.pipeline.lora_state import LoraMixin, LoraState
from fluxjax.pipeline.outputs import as_output, check_output, decode_packed, gather
from fluxjax.pipeline.text import PromptTokenizer, encode_prompts_jit
# The names tests, the commands and users import from here, where they were defined before the
# split into sources.py, defaults.py, checks.py and outputs.py.
from fluxjax.pipeline.checks import OutOfGrammarWarning  # noqa: F401
from fluxjax.pipeline.defaults import DEFAULTS, folder_defaults  # noqa: F401
from fluxjax.pipeline.outputs import to_uint8  # noqa: F401
from fluxjax.pipeline.sources import (DEV_REPO, SCHNELL_REPO, SHAPES_NOTICE, DefaultModelWarning,  # noqa: F401
                                      PromptNormalizedWarning, check_source, default_source)

# Where packaged_folder looks for the packaged models: a name of this module too, so that a test can
# point it at an empty folder (tests/test_default_model.py).
WEIGHTS = sources.WEIGHTS


def packaged_folder(name: str) -> str | None:
    """sources.packaged_folder, looking in this module's WEIGHTS."""
    return sources.packaged_folder(name, WEIGHTS)


def pipeline_for(source: str | os.PathLike) -> type:
    """The class FluxPipeline.from_pretrained(source) builds, from the folder's model_index.json
    alone: Flux2Pipeline for a FLUX.2 folder (Flux2KleinPipeline, Flux2Pipeline), else FluxPipeline."""
    from fluxjax.pipeline import flux2  # FLUX.2 folders have a pipeline of their own

    return flux2.Flux2Pipeline if sources.pipeline_class(os.fspath(source)) in flux2.PIPELINE_CLASSES else FluxPipeline


@dataclass(frozen=True)
class Text:
    """The encoded prompts of a call (stage `encode_prompts`): txt (B, L, context_dim) and vec
    (B, vec_dim), in the transformer's dtype (given embeddings as given, float32); negative: the
    negative prompt's (txt, vec) of the same shapes for true CFG, else None."""

    txt: jax.Array
    vec: jax.Array
    negative: tuple[jax.Array, jax.Array] | None


@dataclass(frozen=True)
class LoopInputs:
    """What the denoising loop takes (stage `prepare`), B images of seq packed tokens and L text
    tokens: img (B, seq, 64) float32, the latents at sigmas[start]; img_ids (B, seq, 3); txt, vec
    (Text's); txt_ids (B, L, 3); sigmas (N + 1,) float32; guidance (B,) float32 or None;
    lora_scales (B, n) float32 or None (the live LoRAs' strengths); cond: sampling.Conditioning
    or None."""

    img: jax.Array
    img_ids: Any
    txt: jax.Array
    txt_ids: Any
    vec: jax.Array
    sigmas: np.ndarray
    guidance: Any
    lora_scales: Any
    cond: sampling.Conditioning | None


class FluxPipeline(LoraMixin, EditMixin):
    """Text to image with FLUX.1. Build with `FluxPipeline.from_pretrained(...)`, call with a prompt.

    Attributes: transformer, t5, clip, vae (Components), tokenizer (PromptTokenizer), schedule
    (sampling.Schedule), kind ("dev", "schnell" or "tiny"), residency ("device", or "host": T5 and CLIP
    in host memory, run on the CPU; fluxjax/pipeline/residency.py), variant ("base", "fill", "control" or
    "kontext": read from the checkpoint, fluxjax.pipeline.conditioning.variant_of), defaults (Defaults: the
    kind's and variant's, or a folder's defaults.json), name (str), timings (seconds of each stage of
    the last call: encode, denoise, decode), grammar (None, or a function that raises ValueError for
    a prompt outside the language the model was trained on: `fluxjax.shapes.dataset.parse` for the packaged
    shapes model; such a prompt still generates, with an OutOfGrammarWarning), lora_state
    (LoraState: the live LoRAs; `loras` and `adapters` read it).
    """

    def __init__(self, transformer: Component, t5: Component, clip: Component, vae: Component,
                 tokenizer: PromptTokenizer, schedule: sampling.Schedule, kind: str, name: str,
                 strategy: Strategy | None = None, mesh: Mesh | None = None, variant: str = "base",
                 defaults: Defaults | None = None, residency: str = "device"):
        check_compatible(transformer.model.config, t5.model.config, clip.model.config, vae.model.config, variant)
        self.transformer, self.t5, self.clip, self.vae = transformer, t5, clip, vae
        self.tokenizer, self.schedule, self.kind, self.name = tokenizer, schedule, kind, name
        self.strategy, self.mesh, self.variant, self.residency = strategy, mesh, variant, residency
        self.defaults = kind_defaults(kind, variant) if defaults is None else defaults
        self.grammar = None
        self.timings: dict[str, float] = {}
        self.lora_state = LoraState()

    # Reference images are Kontext's: a call with them takes max_area (conditioning.kontext_call_size).
    kontext_references = True
    default_strength = conditioning.DEFAULT_STRENGTH  # img2img's and inpainting's, with an image

    @classmethod
    def check_options(cls, root: str, given, name) -> None:
        """Refuse, before loading, options a pipeline of this class cannot take (Flux2Pipeline's
        interface; FluxPipeline takes every request option: its checks run at the call)."""

    @property
    def attention_implementation(self) -> str:
        """The attention the transformer runs at the default size: its `attention_impl`, or what
        "auto" resolves to here (attention.resolve_attention with this process's device, the
        transformer's dtype and head dim, and this pipeline's mesh)."""
        model = self.transformer.model
        if model.attention_impl != "auto":
            return model.attention_impl
        c, d = model.config, self.defaults
        seq_len = (d.height // 16) * (d.width // 16) + d.max_sequence_length
        return attention.auto_implementation(model.dtype, c.hidden_size // c.num_heads, seq_len, masked=False,
                                             mesh_size=1 if self.mesh is None else self.mesh.size)

    # --- loading ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike | None = None, dtype="bfloat16", sharding=None,
                        transformer: str | os.PathLike | None = None, vae: str | os.PathLike | None = None,
                        attention_impl: str = "auto", devices=None, loras=(), fuse: bool = True,
                        variant: str | None = None, quantize: str | None = None,
                        residency: str = "auto") -> "FluxPipeline":
        """Load a pipeline.

        source: a folder in the hub's diffusers layout (model_index.json, transformer/, vae/,
            text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/, scheduler/), as
            `huggingface_hub.snapshot_download` leaves it, whose optional defaults.json sets the
            defaults of `pipe(...)` (folder_defaults); a hub repo id (downloaded with
            huggingface_hub when the network allows); "shapes" (the small model shipped in the
            package, trained on fluxjax.shapes.dataset' captions); "tiny" (random weights, no files); or
            None (default): what `fluxjax generate` takes without --model (default_source:
            FLUX.1-schnell, else -dev, from the local hub cache, else "shapes" with a
            DefaultModelWarning saying so).
        dtype: parameters and compute of every model ("bfloat16" or "float32").
        sharding: None (one device), or a strategy of fluxjax/configs/sharding ("dp", "fsdp", "tp",
            "fsdp_tp"), a path to a strategy file, or a `fluxjax.parallel.strategies.Strategy`: the mesh spans every device of every
            process, each weight is read straight into its shard, and batches are split along
            the strategy's data axes (padded when they do not divide, the padding dropped).
        transformer / vae: BFL single files (flux1-dev.safetensors, ae.safetensors) replacing
            those components of `source`; the transformer may be an fp8 safetensors file or a
            GGUF (docs/quantized_files.md), dequantized to `dtype` as it is read.
        attention_impl: "auto" (default: cuDNN flash attention on NVIDIA GPUs where it applies,
                        splash on a TPU, the CPU kernel on a CPU; `pipe.attention_implementation`
                        says which), "xla", "xla_blocked", "cudnn", "splash" or "cpu"; see
                        attention.dot_product_attention and attention.resolve_attention.
        devices: the devices the strategy's mesh spans (default: every device of every process;
            `jax.local_devices()` gives each host a pipeline of its own, as `fluxjax batch` does).
        loras, fuse: LoRA files to apply, as `load_lora(loras, fuse=fuse)` does.
        variant: None reads the model variant from the checkpoint (`pipe.variant`: in_channels 384
            fill, 128 control; model_index.json's FluxKontextPipeline kontext; else base); "kontext"
            declares a Kontext transformer given as a single file (its shapes are dev's), "base" uses
            a Kontext model without references. A declaration the checkpoint contradicts is refused.
        quantize: None (default), "int8" or "fp8": the Linears of the transformer's blocks and of
            T5 held weight-only quantized on the devices (values + a float32 scale per output
            channel, quantized on the host as they are read; about half the bf16 bytes), the
            embedders, final layer, norms, CLIP and the VAE in `dtype`. Error and memory
            measured in docs/quantization.md.
        residency: where T5 and CLIP live (fluxjax/pipeline/residency.py). "auto" (default): on
            the devices, unless every component's parameters (per device, from their abstract
            shapes and the strategy) and an eighth of a device's memory for temporaries exceed
            that memory (`memory_stats()["bytes_limit"]`; a backend that tells none, the CPU,
            keeps them there): then on the host, said in one line (a ResidencyWarning). "host":
            their parameters in host memory, run on this process's CPU, the outputs sent to the
            devices (the same numbers, seconds slower per call). "device": beside the transformer.
            "auto" rather than a fixed choice: on an accelerator with room for everything the
            encoders run faster there; where they do not fit, "device" would fail to load.
        """
        residency_rules.check_residency(residency)
        if source is not None and pipeline_for(source) is not FluxPipeline:
            from fluxjax.pipeline import flux2

            if residency != "auto":
                raise UsageError(f"residency={residency!r} places FLUX.1's T5 and CLIP; {os.fspath(source)} is a "
                                 "FLUX.2 pipeline: leave residency out")
            return flux2.Flux2Pipeline.from_pretrained(
                source, dtype, attention_impl=attention_impl, sharding=sharding, transformer=transformer, vae=vae,
                devices=devices, loras=loras, fuse=fuse, variant=variant, quantize=quantize)
        check_mode(quantize)
        enable_compilation_cache()
        dtype = jnp.dtype(dtype)
        strategy = mesh = None
        if sharding is not None:
            strategy = sharding if isinstance(sharding, Strategy) else Strategy.load(sharding)
            mesh = strategy.make_mesh(devices)
        attention.check_implementation(attention_impl, (list(devices) if devices else jax.devices())[0])
        device = mesh.devices.flat[0] if mesh is not None else jax.local_devices()[0]
        settings = dict(strategy=strategy, mesh=mesh, quantize=quantize, residency=residency, device=device)
        if source is None:
            source, notice = default_source()
            if notice is not None:
                warnings.warn(notice, DefaultModelWarning, stacklevel=2)
        if os.fspath(source) == "tiny":
            if transformer is not None or vae is not None:
                raise UsageError("the tiny preset has random weights: transformer= / vae= need a real `source`")
            pipe = cls._tiny(dtype, attention_impl, variant, **settings)
        else:
            root = sources.resolve_source(os.fspath(source))
            if pipeline_for(root) is not FluxPipeline:  # a FLUX.2 hub repo id, now in the hub cache
                return cls.from_pretrained(root, dtype, sharding, transformer, vae, attention_impl, devices, loras,
                                           fuse, variant, quantize)
            pipe = cls._from_folder(root, dtype, transformer, vae, attention_impl, variant, **settings)
            if sources.is_packaged(root, "shapes"):
                from fluxjax.shapes.dataset import parse

                pipe.grammar = parse
        if loras:
            pipe.load_lora(loras, fuse=fuse)
        return pipe

    @classmethod
    def _from_folder(cls, root, dtype, transformer_file, vae_file, attention_impl, declared, strategy,
                     mesh, quantize, residency, device) -> "FluxPipeline":
        sources.check_folder(root, transformer_file, vae_file)
        overrides = read_defaults(root)  # before minutes of loading: a bad file fails at once
        files = {name: os.path.join(root, spec.folder) for name, spec in COMPONENTS.items()}
        files.update({k: v for k, v in (("transformer", transformer_file), ("vae", vae_file)) if v is not None})
        sharding = strategy.param_shardings(mesh) if strategy else None
        options = {name: component_options(name, attention_impl, quantize) for name in files}
        where, shardings = _placement(residency, lambda: {name: registry.model_of(name, src, dtype, **options[name])
                                                          for name, src in files.items()}, sharding, device)
        components = {name: Component(*load(name, src, dtype, shardings[name], **options[name]))
                      for name, src in files.items()}
        guidance_embed = components["transformer"].model.config.guidance_embed
        kind = "dev" if guidance_embed else "schnell"
        scheduler = os.path.join(root, "scheduler", "scheduler_config.json")
        schedule = sampling.Schedule.from_config(scheduler) if os.path.isfile(scheduler) else kind_schedule(kind)
        variant = conditioning.variant_of(components["transformer"].model.config.in_channels,
                                          sources.pipeline_class(root), declared,
                                          where=transformer_file or os.path.join(root, "transformer"))
        # a packaged model is named by its package (fluxjax/shapes/weights is "shapes"), any other by its folder
        name = (None if transformer_file else sources.packaged_name(root)) \
            or os.path.basename(os.path.normpath(transformer_file or root))
        tokenizer = PromptTokenizer.from_folder(root)
        if sources.is_packaged(root, "shapes"):  # its tokenizers read a prompt as its grammar check (shapes.parse) does
            from fluxjax.shapes.dataset import normalize

            tokenizer = sources.NormalizingTokenizer(tokenizer, normalize, name)
        return cls(**components, tokenizer=tokenizer, schedule=schedule, kind=kind, name=name, strategy=strategy,
                   mesh=mesh,
                   variant=variant, defaults=with_overrides(root, overrides, guidance_embed, kind_defaults(kind, variant)),
                   residency=where)

    @classmethod
    def _tiny(cls, dtype, attention_impl, declared, strategy, mesh, quantize, residency, device) -> "FluxPipeline":
        """Small random models and locally trained tokenizers: for demos and tests, not images."""
        sharding = strategy.param_shardings(mesh) if strategy else None
        where, shardings = _placement(residency, lambda: tiny_models(dtype, attention_impl, quantize), sharding, device)
        components, tokenizer = tiny_components(dtype, attention_impl, shardings, quantize)
        variant = conditioning.variant_of(components["transformer"].model.config.in_channels, None, declared, "tiny")
        return cls(**components, tokenizer=tokenizer, schedule=sampling.Schedule.dev(), kind="tiny", name="tiny",
                   strategy=strategy, mesh=mesh, variant=variant, residency=where)

    # --- generation ------------------------------------------------------------------------

    def __call__(self, prompt: str | Sequence[str] | None = None, height: int | None = None, width: int | None = None,
                 num_steps: int | None = None, guidance: float | None = None, seed: int | Sequence[int] = 0,
                 latents=None, max_sequence_length: int | None = None, output: str = "pil",
                 progress: bool = False, lora_scales=None, *, image=None, strength: float | None = None,
                 mask_image=None, resize: str | None = None, negative_prompt: str | Sequence[str] | None = None,
                 true_cfg_scale=None, prompt_2: str | Sequence[str] | None = None,
                 negative_prompt_2: str | Sequence[str] | None = None, prompt_embeds=None, pooled_prompt_embeds=None,
                 negative_prompt_embeds=None, negative_pooled_prompt_embeds=None, sigmas=None,
                 reference_images=None, control_image=None, max_area: int | None = None,
                 auto_resize: bool | None = None, allow_references: bool = False):
        """Generate one image per prompt; optionally from an image (img2img, inpainting), with true CFG.

        prompt: a string or a list of B strings (with `latents` or a list of images of batch B, one
            string is used B times). It goes to CLIP, and to T5 unless `prompt_2` is given
            (diffusers' FluxPipeline: prompt_2 is the T5 prompt).
        height, width: pixels, multiples of 16 (default: the model's, 1024x1024; from `latents`
            or `image` when those are given).
        num_steps, guidance, max_sequence_length: default to the model's (schnell: 4, no
            guidance, T5 length 256; dev: 28, 3.5, 512). Guidance is refused by models without
            a guidance embedding.
        seed: an int s (image i uses seed s + i) or a list of B ints; image i's noise depends on
            its own seed only.
        latents: initial noise (B, 16, H/8, W/8) (NCHW, as `torch.randn` gives it) instead of
            seeds; with `image`, the noise mixed with the image's latents.
        output: "np" -> float32 array (B, H, W, 3) in [0, 1]; "pil" -> list of PIL images.
        progress: show a progress bar over the stages and steps (on a terminal).
        lora_scales: strengths of the live LoRAs (see load_lora): one number per LoRA, or a
            (B, n) table, one row per image (a batch may mix LoRAs and strengths); default:
            the strengths they were loaded with.
        image: img2img's start (diffusers' FluxImg2ImgPipeline): a path, PIL image or array
            (H, W, 3) (fluxjax/pipeline/conditioning.py), or a list of 1 or B of them of one size; the
            output has its size. Encoded to the VAE posterior's mean; the run takes the last
            int(num_steps x strength) steps from sigma_s noise + (1 - sigma_s) image latents.
        strength: in (0, 1] (default 0.6, as diffusers); 1 starts from pure noise.
        mask_image: inpainting (FluxInpaintPipeline): white (>= 0.5) repaints, black keeps; a
            path, PIL image or (H, W) array of the image's size, one or B of them. The kept
            region is re-noised to each step's time and blended in after every step.
        resize: None, "crop" or "scale": how an image (and its mask) whose sides are not
            multiples of 16 is brought to them (fluxjax/pipeline/conditioning.py).
        negative_prompt, true_cfg_scale: true classifier-free guidance (diffusers' FluxPipeline):
            v = v_neg + s (v - v_neg) with a second transformer call per step; s > 1, one number
            or B. negative_prompt_2 is the negative prompt's T5 text (default: negative_prompt).
        prompt_embeds (B, L, context_dim), pooled_prompt_embeds (B, vec_dim): precomputed T5 and
            pooled CLIP embeddings instead of `prompt`; negative_prompt_embeds and
            negative_pooled_prompt_embeds likewise instead of `negative_prompt`.
        sigmas: N custom timesteps in (0, 1], decreasing, instead of the schedule's linspace; shifted
            by the schedule as diffusers' scheduler shifts given sigmas (N steps, 0 appended).
        The model variants (`pipe.variant`, fluxjax/pipeline/conditioning.py; a wrong combination is refused):
        image, mask_image on a Fill model: the image and the region to repaint (white), as
            FluxFillPipeline: the masked image's latents and the packed mask are extra input
            channels at every step; strength defaults to 1 (from pure noise) as there.
        control_image: a control model's (FLUX.1-Canny/Depth, or a base model with a control LoRA)
            edge or depth map, as FluxControlPipeline: its latents are extra input channels; one
            or B of them of one size, which the output takes.
        reference_images: a list of reference images for Kontext, shared by every image of the
            call, appended to the sequence with ids (i + 1, row, col), as FluxKontextPipeline (a
            base model takes them only with allow_references=True). Each is resized to the
            preferred Kontext resolution nearest its aspect ratio unless auto_resize=False (then
            `resize` applies), and the output to max_area pixels (default 1024**2) at the
            requested aspect ratio, as diffusers does.
        """
        request = self.check(prompt, height, width, num_steps, guidance, seed, latents, max_sequence_length, output,
                             progress, lora_scales, image=image, strength=strength, mask_image=mask_image,
                             resize=resize, negative_prompt=negative_prompt, true_cfg_scale=true_cfg_scale,
                             prompt_2=prompt_2, negative_prompt_2=negative_prompt_2, prompt_embeds=prompt_embeds,
                             pooled_prompt_embeds=pooled_prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                             negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, sigmas=sigmas,
                             reference_images=reference_images, control_image=control_image, max_area=max_area,
                             auto_resize=auto_resize, allow_references=allow_references)
        from tqdm import tqdm

        inputs, context = self._placed(request.inputs)
        steps = request.steps
        with context, tqdm(total=steps + 2, desc="encoding prompt", unit="stage", disable=not progress or None, leave=False) as bar:
            with self._timed("encode"):
                text = self.encode_prompts(inputs)
                state = self.prepare(request, inputs, text)
                text.txt.block_until_ready()
            bar.update(1)

            bar.set_description(f"denoising ({steps} steps)")
            with self._timed("denoise"):
                latents = self.denoise(state, (lambda i: bar.update(1)) if progress else None)
            if not progress:
                bar.update(steps)

            bar.set_description("decoding")
            with self._timed("decode"):
                images = self.decode(latents, request.batch, request.height, request.width)
            bar.update(1)
        return as_output(images, request.output)

    def check(self, prompt, height, width, num_steps, guidance, seed, latents, max_sequence_length, output, progress,
              lora_scales, *, image, strength, mask_image, resize, negative_prompt, true_cfg_scale, prompt_2,
              negative_prompt_2, prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds,
              negative_pooled_prompt_embeds, sigmas, reference_images, control_image, max_area, auto_resize,
              allow_references) -> CheckedRequest:
        """Stage 1: `__call__`'s arguments (every one; see there) checked and made into the host
        arrays of a CheckedRequest: images read, prompts tokenized, seeds drawn into noise, the
        schedule computed. No model runs: a bad argument is one UsageError before any heavy work."""
        if output not in ("np", "pil"):
            raise UsageError(f"output must be 'np' or 'pil', got {output!r}")
        conditioning.check_use(self.variant, self.name, image=image, mask_image=mask_image,
                               reference_images=reference_images, control_image=control_image,
                               allow_references=allow_references)
        if reference_images is None and (max_area is not None or auto_resize is not None):
            raise UsageError("max_area and auto_resize apply to reference_images (Kontext) only")
        # resize serves control and reference images too: only without any image is it refused.
        other_images = control_image is not None or reference_images is not None
        images = checks.condition_images(image, strength, mask_image, None if image is None and other_images else resize)
        controls = None if control_image is None else conditioning.load_images(control_image, resize, "control_image")
        text = checks.TextInputs.check(prompt, prompt_2, prompt_embeds, pooled_prompt_embeds, "prompt")
        if reference_images is not None:
            height, width = checks.kontext_size(self.defaults, height, width, latents, max_area)
        size_from = images[0][0] if images is not None else None if controls is None else controls[0]
        prompts, batch, noise, height, width = checks.prompts_and_noise(self.defaults, prompt, height, width, seed,
                                                                        latents, text.batch, size_from)
        if prompts is not None:
            checks.check_grammar(self.grammar, self.name, prompts, stacklevel=3)  # the line calling the pipeline
        if sigmas is not None:
            sigmas = sampling.check_sigmas(sigmas)
            if num_steps is not None and num_steps != len(sigmas):
                raise UsageError(f"num_steps {num_steps} but {len(sigmas)} sigmas: leave num_steps unset with sigmas")
            num_steps = len(sigmas)
        num_steps, guidance, max_sequence_length = self.settings(num_steps, guidance, max_sequence_length)
        negative = checks.TextInputs.check(negative_prompt, negative_prompt_2, negative_prompt_embeds,
                                           negative_pooled_prompt_embeds, "negative_prompt", batch)
        true_cfg = checks.true_cfg(true_cfg_scale, negative.given, batch)
        seq_len = (height // 16) * (width // 16)
        schedule = self.schedule.sigmas(num_steps, seq_len) if sigmas is None else self.schedule.shift_sigmas(sigmas, seq_len)
        default_strength = 1.0 if self.variant == "fill" else conditioning.DEFAULT_STRENGTH  # FluxFillPipeline's is 1
        start = 0 if images is None else conditioning.strength_start(
            num_steps, default_strength if strength is None else strength)

        config = self.transformer.model.config
        text_length = max_sequence_length if text.embeds is None else text.embeds[0].shape[1]
        inputs = dict(noise=sampling.pack(noise), img_ids=sampling.image_ids(batch, height, width),
                      txt_ids=sampling.text_ids(batch, text_length),
                      guidance=None if guidance is None else np.full((batch,), guidance, np.float32),
                      text=text.inputs(self.tokenizer, prompts, max_sequence_length, config))
        if true_cfg is not None:
            inputs["true_cfg"] = true_cfg
            inputs["negative"] = negative.inputs(self.tokenizer, negative.prompts, max_sequence_length, config,
                                                 text_length)
        if images is not None:
            pixels, masks = images
            inputs["pixels"] = conditioning.to_model_pixels(checks.per_image(pixels, batch, "image"))
            if masks is not None and self.variant == "fill":  # Fill's inputs: the image and its pixel mask
                inputs["variant"] = {"fill_pixels": inputs["pixels"],
                                     "fill_mask": checks.per_image(masks, batch, "mask_image")}
            elif masks is not None:
                inputs["mask"] = conditioning.mask_latents(checks.per_image(masks, batch, "mask_image"))
        if controls is not None:
            inputs["variant"] = {"control_pixels": conditioning.to_model_pixels(
                checks.per_image(controls, batch, "control_image"))}
        if reference_images is not None:
            inputs["variant"] = conditioning.kontext_inputs(reference_images, batch, auto_resize is not False, resize)
        lora_table = self.lora_state.scales(lora_scales, batch)
        if lora_table is not None:
            inputs["lora_scales"] = lora_table
        return CheckedRequest(batch, height, width, start, num_steps - start, schedule, inputs, output, progress)

    def encode_prompts(self, inputs: dict) -> Text:
        """Stage 2: the prompts of `inputs` (a CheckedRequest's, placed by `_placed`) through T5 and
        CLIP: Text, txt (B, L, context_dim) and vec (B, vec_dim) in the transformer's dtype (given
        embeddings pass as given), and with true CFG the negative prompt's."""
        txt, vec = self._text(inputs["text"])
        return Text(txt, vec, self._text(inputs["negative"]) if "negative" in inputs else None)

    def prepare(self, request: CheckedRequest, inputs: dict, text: Text) -> LoopInputs:
        """Stage 3: what the loop starts from. The latents (B, seq, 64) float32: the noise, or with
        an image its latents (the VAE posterior's mean) noised to sigmas[request.start]; the
        conditioning: true CFG's negative text, inpainting's image latents, noise and mask, and
        the variant's extra channels or reference tokens (sampling.Conditioning; VAE-encoded here)."""
        cond = {}
        if text.negative is not None:
            cond.update(zip(("neg_txt", "neg_vec"), text.negative), true_cfg=inputs["true_cfg"])
        img = inputs["noise"]
        if "pixels" in inputs:
            image_latents = conditioning.encode_packed(self.vae.model, self.vae.params, inputs["pixels"])
            img = sampling.scale_noise(image_latents, inputs["noise"], request.sigmas[request.start])
            cond["start"] = np.int32(request.start)
            if "mask" in inputs:
                cond.update(image_latents=image_latents, noise=inputs["noise"], mask=inputs["mask"])
        if "variant" in inputs:  # the variant's extra channels or reference tokens
            cond.update(conditioning.encode_variant(self.vae.model, self.vae.params, inputs["variant"]))
        return LoopInputs(img, inputs["img_ids"], text.txt, inputs["txt_ids"], text.vec, request.sigmas,
                          inputs["guidance"], inputs.get("lora_scales"), sampling.Conditioning(**cond) if cond else None)

    def denoise(self, state: LoopInputs, on_step: Callable[[int], None] | None = None) -> jax.Array:
        """Stage 4: the sampling loop (sampling.denoise) with the transformer and the live LoRAs
        from `state`: packed latents (B, seq, 64) float32 at sigma 0, computed when it returns.
        on_step(i): run on the host after step i (a progress bar), or None."""
        with sampling.step_callback(on_step or (lambda i: None)) as callback:
            latents = sampling.denoise(
                self.transformer.model, self.transformer.params, state.img, state.img_ids, state.txt,
                state.txt_ids, state.vec, state.sigmas, state.guidance, on_step=None if on_step is None else callback,
                adapters=None if self.adapters is None else self.adapters.tree, lora_scales=state.lora_scales,
                cond=state.cond,
            )
            latents.block_until_ready()  # inside: the step callbacks run while the loop does
        return latents

    def decode(self, latents: jax.Array, batch: int, height: int, width: int,
               what: str = "the denoised latents of images") -> np.ndarray:
        """Stage 5: packed latents (B', seq, 64) through the VAE decoder: images (batch, H, W, 3)
        float32 in [0, 1] on the host (a sharded batch's padding dropped). NonFiniteError when a
        latent (named as `what`) or an image holds NaN or infinity."""
        # Checked before decoding too: the decoder clips, so an infinite latent would decode finite.
        check_output(gather(latents)[:batch], what)
        images = gather(decode_packed(self.vae.model, self.vae.params, latents, height, width))[:batch]
        check_output(images)
        return images

    def _placed(self, inputs: dict):
        """(inputs, context): host `inputs` split along the strategy's data axes (padded to divide
        them) and the context that activates its mesh; as given, and no context, without one."""
        return placed(self.strategy, self.mesh, inputs)

    @contextlib.contextmanager
    def _timed(self, stage: str):
        """Record the seconds the block takes as timings[stage]; "encode", a call's first, starts them anew."""
        start = time.perf_counter()
        yield
        if stage == "encode":
            self.timings = {}
        self.timings[stage] = time.perf_counter() - start

    def _text(self, text: dict):
        """(txt, vec) from token ids ({"t5", "clip"}) or from given embeddings ({"txt", "vec"})."""
        if "txt" in text:  # host arrays, or already placed on the mesh by put_batch
            return jnp.asarray(text["txt"]), jnp.asarray(text["vec"])
        return self.encode(text["t5"], text["clip"])

    def encode(self, t5_ids, clip_ids):
        """Token ids (B, L) and (B, 77) -> txt (B, L, context_dim), vec (B, vec_dim) in the transformer's dtype.

        Sharded as the pipeline's strategy says when called inside `self.strategy.activate(self.mesh)`.
        With the encoders on the host (`residency`), they run on the CPU and their outputs are
        placed as the strategy places a batch (ids given placed are gathered to the host first).
        """
        if self.residency != "host":
            return encode_prompts_jit(self.t5.model, self.t5.params, self.clip.model, self.clip.params,
                                      t5_ids, clip_ids, self.transformer.model.dtype)
        ids = [gather(x) if isinstance(x, jax.Array) else np.asarray(x) for x in (t5_ids, clip_ids)]
        with residency_rules.on_host():
            out = encode_prompts_jit(self.t5.model, self.t5.params, self.clip.model, self.clip.params, *ids,
                                     self.transformer.model.dtype)
        out = tuple(np.asarray(x) for x in out)
        if self.strategy is None:
            return tuple(jax.device_put(x, jax.local_devices()[0]) for x in out)
        return self.strategy.put_batch(out, self.mesh)[0]

    def settings(self, num_steps: int | None = None, guidance: float | None = None,
                 max_sequence_length: int | None = None) -> tuple[int, float | None, int]:
        """(num_steps, guidance, max_sequence_length) as a call with these arguments uses them:
        None filled in from the model's defaults; guidance None for models without a guidance
        embedding, which refuse one given (UsageError)."""
        return resolve_settings(self.defaults, self.transformer.model.config.guidance_embed,
                                f"{self.name} ({self.kind})", num_steps, guidance, max_sequence_length)


def _placement(residency: str, models: Callable[[], dict], sharding, device) -> tuple[str, dict]:
    """(where the text encoders go, {component: the ShardingFn its parameters are placed by}).

    residency: from_pretrained's; models(): {component: linen module} as it will be loaded (built
    only when "auto" has a device memory to weigh them against); sharding: the strategy's
    ShardingFn or None; device: one of the devices it places on. "host" places T5 and CLIP on
    the CPU device (registry.on_host); "auto" says so in one line (residency.ResidencyWarning).
    """
    limit = residency_rules.memory_limit(device) if residency == "auto" else None
    weights = {} if limit is None else {name: device_bytes(registry.abstract_params(name, model), sharding)
                                        for name, model in models().items()}
    where, line = residency_rules.decide(residency, weights, limit)
    if line is not None:
        warnings.warn(line, residency_rules.ResidencyWarning, stacklevel=4)  # the line calling from_pretrained
    if where == "host":
        registry.host_device()  # a one-line error now, not deep in the first placement
    return where, {name: registry.on_host if where == "host" and name in residency_rules.ENCODERS else sharding
                   for name in COMPONENTS}
