"""FluxPipeline: prompt -> T5 + CLIP -> jitted Euler loop over the transformer -> VAE -> images.

Three compiled functions, each compiled once per shape and reused: text encoding (per batch
size and T5 length), denoising (per batch, size and number of steps; latents, text, schedule
and guidance are arguments), decoding (per batch and size). A new seed, prompt or guidance of
a known shape runs without compiling; JAX's persistent cache (fluxjax.runtime) keeps the
executables across processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.resources
import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fluxjax.pipeline import conditioning
from fluxjax.sampling import sampler as sampling
from fluxjax.runtime import enable_compilation_cache
from fluxjax.config import AutoEncoderConfig, CLIPConfig, FluxConfig, T5Config
from fluxjax.errors import NonFiniteError, UsageError
from fluxjax.loading.registry import COMPONENTS, PRESETS, load, random_component
from fluxjax.models import layers
from fluxjax.models.autoencoder import AutoEncoder
from fluxjax.models.quantize import check_mode
from fluxjax.models.tiled_decode import decode_tiled
from fluxjax.parallel.strategies import Strategy, jit_with_rules
from fluxjax.pipeline.text import PromptTokenizer, check_prompt, encode_prompts_jit
from fluxjax.pipeline.tiny_tokenizers import make_tokenizers

HUB_FOLDERS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
SCHNELL_REPO = "black-forest-labs/FLUX.1-schnell"
DEV_REPO = "black-forest-labs/FLUX.1-dev"
# Hub-layout folders shipped inside the package as fluxjax/NAME/weights, loaded by NAME (package
# data, found through importlib.resources, so a wheel install has them too). A name here wins over
# a local folder of the same name, as "tiny" does: "./shapes" reaches such a folder.
PACKAGED_MODELS = ("shapes",)
DEFAULTS_FILE = "defaults.json"  # a pipeline folder's own defaults (see folder_defaults)
SHAPES_NOTICE = (
    "no FLUX.1 weights in the local hub cache, so this uses the built-in `shapes` model (fluxjax/shapes/weights), "
    "which draws only 'a {color} {shape} on a {color} background[ in the {position}]'; for FLUX.1, run "
    "huggingface_hub.snapshot_download('black-forest-labs/FLUX.1-schnell') on a machine with network "
    "(it is then found in the hub cache) or pass its folder (--model PATH)"
)


class DefaultModelWarning(UserWarning):
    """`FluxPipeline.from_pretrained()` without a source found no FLUX.1 and loaded `shapes`."""


class OutOfGrammarWarning(UserWarning):
    """A prompt the shapes model was not trained on (outside fluxjax.shapes.dataset.GRAMMAR): it still
    generates, but the image need not show the prompt."""


class PromptNormalizedWarning(UserWarning):
    """The shapes model read a prompt lower-cased, without final punctuation (fluxjax.shapes.dataset.normalize)."""


class NormalizingTokenizer(PromptTokenizer):
    """Tokenizers that see each prompt as `normalize` writes it, saying so (a PromptNormalizedWarning,
    one line per prompt it changed). The shapes model's: its grammar check (shapes.parse) ignores
    case and final punctuation, its tokenizers learnt lower-case captions only, so both must read
    "A RED CIRCLE ON A BLUE BACKGROUND." as "a red circle on a blue background"."""

    def __init__(self, tokenizer: PromptTokenizer, normalize, name: str):
        super().__init__(tokenizer.clip, tokenizer.t5, tokenizer.clip_length)
        self.normalize, self.name = normalize, name

    def _read(self, prompts):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        out = [self.normalize(p) if isinstance(p, str) else p for p in prompts]
        for before, after in dict.fromkeys(zip(prompts, out)):
            if before != after:
                warnings.warn(f"{self.name} reads prompts in lower case without final punctuation, as it was trained: "
                              f"{before!r} is read as {after!r}", PromptNormalizedWarning, stacklevel=4)
        return out

    def __call__(self, prompts, max_sequence_length: int):
        return super().__call__(self._read(prompts), max_sequence_length)

    def tokenize_t5(self, prompts, max_sequence_length: int):
        return super().tokenize_t5(self._read(prompts), max_sequence_length)

    def tokenize_clip(self, prompts):
        return super().tokenize_clip(self._read(prompts))


@dataclass(frozen=True)
class Defaults:
    """What `pipe(...)` uses for an argument left at None."""

    num_steps: int
    guidance: float | None
    max_sequence_length: int
    height: int = 1024
    width: int = 1024


# dev vs schnell is read from the checkpoint: a guidance embedding means a guidance-distilled
# (dev-like) model. The tiny preset is sized for a CPU smoke test.
DEFAULTS = {
    "dev": Defaults(num_steps=28, guidance=3.5, max_sequence_length=512),
    "schnell": Defaults(num_steps=4, guidance=None, max_sequence_length=256),
    "tiny": Defaults(num_steps=4, guidance=3.5, max_sequence_length=64, height=256, width=256),
}
# FLUX.1-Fill-dev's own defaults (diffusers' FluxFillPipeline): more steps, a much higher guidance.
FILL_DEFAULTS = Defaults(num_steps=50, guidance=30.0, max_sequence_length=512)


def kind_defaults(kind: str, variant: str = "base") -> Defaults:
    """The defaults of a model of `kind` ("dev", "schnell", "tiny") and `variant` (a Fill dev model has its own)."""
    return FILL_DEFAULTS if variant == "fill" and kind == "dev" else DEFAULTS[kind]


@dataclass
class Component:
    """A linen module with its parameters."""

    model: Any
    params: Any


def component_options(component: str, attention_impl: str, quantize: str | None = None) -> dict[str, Any]:
    """The build options of `component` for the pipeline's `attention_impl` and `quantize`. The text
    encoders' attention is masked (T5's position bias, CLIP's causal mask): implementations that
    take no mask ("splash", "cpu") are the transformer's alone, and the encoders resolve "auto".
    quantize reaches the components that take it (the transformer and T5; CLIP and the VAE, 0.2
    and 0.1 of the 12B+4.8B weights, stay in the pipeline's dtype)."""
    masked = component in ("t5", "clip") and attention_impl in ("splash", "cpu")
    return COMPONENTS[component].select(dict(attention_impl="auto" if masked else attention_impl, layer_loop="auto",
                                             quantize=quantize))


class FluxPipeline:
    """Text to image with FLUX.1. Build with `FluxPipeline.from_pretrained(...)`, call with a prompt.

    Attributes: transformer, t5, clip, vae (Components), tokenizer (PromptTokenizer), schedule
    (sampling.Schedule), kind ("dev", "schnell" or "tiny"), variant ("base", "fill", "control" or
    "kontext": read from the checkpoint, fluxjax.pipeline.conditioning.variant_of), defaults (Defaults: the
    kind's and variant's, or a folder's defaults.json), name (str), timings (seconds of each stage of
    the last call: encode, denoise, decode), grammar (None, or a function that raises ValueError for
    a prompt outside the language the model was trained on: `fluxjax.shapes.dataset.parse` for the packaged
    shapes model; such a prompt still generates, with an OutOfGrammarWarning).

    On a CPU without a mesh the transformer runs with layer_loop="unrolled": the loader gives
    its block parameters as per-block arrays (fluxjax.loading.registry.default_layer_loop), so
    `transformer.params` has `double_blocks_0`, ... instead of the stacked `double_blocks`.
    """

    def __init__(self, transformer: Component, t5: Component, clip: Component, vae: Component,
                 tokenizer: PromptTokenizer, schedule: sampling.Schedule, kind: str, name: str,
                 strategy: Strategy | None = None, mesh: Mesh | None = None, variant: str = "base",
                 defaults: Defaults | None = None):
        _check_compatible(transformer.model.config, t5.model.config, clip.model.config, vae.model.config, variant)
        self.transformer, self.t5, self.clip, self.vae = transformer, t5, clip, vae
        self.tokenizer, self.schedule, self.kind, self.name = tokenizer, schedule, kind, name
        self.strategy, self.mesh, self.variant = strategy, mesh, variant
        self.defaults = kind_defaults(kind, variant) if defaults is None else defaults
        self.grammar = None
        self.timings: dict[str, float] = {}
        self.loras: list[tuple[str, float]] = []  # live LoRAs (file, default strength), see load_lora
        self.adapters = None  # their fluxjax.lora.adapters.Adapters, on the device
        self._params_before_loras = None  # transformer params before live LoRAs replaced tensors
        self._before_widening = None  # the base transformer before a control LoRA widened its img_in

    @property
    def attention_implementation(self) -> str:
        """The attention the transformer runs at the default size: its `attention_impl`, or what
        "auto" resolves to here (layers.resolve_attention with this process's device, the
        transformer's dtype and head dim, and this pipeline's mesh)."""
        model = self.transformer.model
        if model.attention_impl != "auto":
            return model.attention_impl
        c, d = model.config, self.defaults
        seq_len = (d.height // 16) * (d.width // 16) + d.max_sequence_length
        return layers.auto_implementation(model.dtype, c.hidden_size // c.num_heads, seq_len, masked=False,
                                          mesh_size=1 if self.mesh is None else self.mesh.size)

    # --- loading ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike | None = None, dtype="bfloat16", sharding=None,
                        transformer: str | os.PathLike | None = None, vae: str | os.PathLike | None = None,
                        attention_impl: str = "auto", devices=None, loras=(), fuse: bool = True,
                        variant: str | None = None, quantize: str | None = None) -> "FluxPipeline":
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
                        layers.dot_product_attention and layers.resolve_attention.
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
        """
        check_mode(quantize)
        enable_compilation_cache()
        dtype = jnp.dtype(dtype)
        strategy = mesh = None
        if sharding is not None:
            strategy = sharding if isinstance(sharding, Strategy) else Strategy.load(sharding)
            mesh = strategy.make_mesh(devices)
        layers.check_implementation(attention_impl, (list(devices) if devices else jax.devices())[0])
        settings = dict(strategy=strategy, mesh=mesh, quantize=quantize)
        if source is None:
            source, notice = default_source()
            if notice is not None:
                warnings.warn(notice, DefaultModelWarning, stacklevel=2)
        if os.fspath(source) == "tiny":
            if transformer is not None or vae is not None:
                raise UsageError("the tiny preset has random weights: transformer= / vae= need a real `source`")
            pipe = cls._tiny(dtype, attention_impl, variant, **settings)
        else:
            root = _resolve_source(os.fspath(source))
            pipe = cls._from_folder(root, dtype, transformer, vae, attention_impl, variant, **settings)
            if _is_packaged(root, "shapes"):
                from fluxjax.shapes.dataset import parse

                pipe.grammar = parse
        if loras:
            pipe.load_lora(loras, fuse=fuse)
        return pipe

    def load_lora(self, loras, fuse: bool = False) -> None:
        """Apply LoRAs to the transformer (any format of fluxjax.lora.formats).

        loras: a file, a (file, strength) pair, or a list of either (strength 1.0 when omitted).
        fuse: True folds W + strength * alpha/r * B A into the weights (on the device, in each
            weight's sharding; no cost per step, strengths fixed); False runs the LoRAs live in
            the denoising loop next to those loaded live before, their strengths adjustable per
            call and per image with `pipe(..., lora_scales=...)` without recompiling.
        Full replacement tensors (control LoRAs' QK-norm scales) replace the weights either way.
        """
        from fluxjax.lora import adapters as lora

        items = [loras] if isinstance(loras, (str, os.PathLike)) or (
            isinstance(loras, tuple) and len(loras) == 2 and isinstance(loras[1], (int, float))) else list(loras)
        pairs = [(os.fspath(x), 1.0) if isinstance(x, (str, os.PathLike)) else (os.fspath(x[0]), float(x[1])) for x in items]
        for file, strength in pairs:  # before any file is read
            lora.check_strengths(strength, f"load_lora {file}")
        t = self.transformer
        widen = self.variant == "base"  # a structural-control LoRA turns a base model into a control one
        if fuse:
            if self.loras:
                raise UsageError("fuse LoRAs before loading live ones (or call pipe.unload_lora() first)")
            adapters = lora.load_loras([f for f, _ in pairs], t.model.config, t.params, t.model.param_dtype, widen)
            t = self._widened(t, adapters)
            self.transformer = Component(t.model, lora.fuse(t.params, adapters, [s for _, s in pairs]))
            return
        base = t if self._params_before_loras is None else Component(t.model, self._params_before_loras)
        adapters = lora.load_loras([f for f, _ in self.loras + pairs], t.model.config, base.params,
                                   t.model.param_dtype, widen)
        if adapters.input_width is not None:  # restored by unload_lora
            self._before_widening = base
        base = self._widened(base, adapters)
        self.loras, self._params_before_loras = self.loras + pairs, base.params
        self.transformer = Component(base.model, lora.with_replacements(base.params, adapters))
        placement = NamedSharding(self.mesh, PartitionSpec()) if self.mesh is not None else None
        self.adapters = lora.Adapters(jax.device_put(adapters.tree, placement), {}, adapters.names, adapters.formats)

    @classmethod
    def _from_folder(cls, root, dtype, transformer_file, vae_file, attention_impl, declared, strategy,
                     mesh, quantize) -> "FluxPipeline":
        needed = [f for f in HUB_FOLDERS if not (f == "transformer" and transformer_file) and not (f == "vae" and vae_file)]
        missing = [f for f in needed if not os.path.isdir(os.path.join(root, f))]
        if missing:
            raise UsageError(f"{root}: not a FLUX pipeline folder, missing {', '.join(m + '/' for m in missing)} "
                             "(expected the hub's diffusers layout)")
        for label, path in (("transformer", transformer_file), ("vae", vae_file)):
            if path is not None and not os.path.isfile(path):
                raise UsageError(f"{label}={os.fspath(path)!r}: no such file (expected a BFL .safetensors file)")
        overrides = _read_defaults(root)  # before minutes of loading: a bad file fails at once
        sources = {name: os.path.join(root, spec.folder) for name, spec in COMPONENTS.items()}
        sources.update({k: v for k, v in (("transformer", transformer_file), ("vae", vae_file)) if v is not None})
        sharding = strategy.param_shardings(mesh) if strategy else None
        components = {name: Component(*load(name, src, dtype, sharding, **component_options(name, attention_impl, quantize)))
                      for name, src in sources.items()}
        guidance_embed = components["transformer"].model.config.guidance_embed
        kind = "dev" if guidance_embed else "schnell"
        scheduler = os.path.join(root, "scheduler", "scheduler_config.json")
        schedule = sampling.Schedule.from_config(scheduler) if os.path.isfile(scheduler) else _default_schedule(kind)
        variant = conditioning.variant_of(components["transformer"].model.config.in_channels, _pipeline_class(root),
                                          declared, where=transformer_file or os.path.join(root, "transformer"))
        # a packaged model is named by its package (fluxjax/shapes/weights is "shapes"), any other by its folder
        name = (None if transformer_file else next((n for n in PACKAGED_MODELS if _is_packaged(root, n)), None)) \
            or os.path.basename(os.path.normpath(transformer_file or root))
        tokenizer = PromptTokenizer.from_folder(root)
        if _is_packaged(root, "shapes"):  # its tokenizers read a prompt as its grammar check (shapes.parse) does
            from fluxjax.shapes.dataset import normalize

            tokenizer = NormalizingTokenizer(tokenizer, normalize, name)
        return cls(**components, tokenizer=tokenizer, schedule=schedule, kind=kind, name=name, strategy=strategy,
                   mesh=mesh,
                   variant=variant, defaults=_with_overrides(root, overrides, guidance_embed, kind_defaults(kind, variant)))

    @classmethod
    def _tiny(cls, dtype, attention_impl, declared, strategy, mesh, quantize) -> "FluxPipeline":
        """Small random models and locally trained tokenizers: for demos and tests, not images."""
        with tempfile.TemporaryDirectory() as folder:
            make_tokenizers(folder)
            tokenizer = PromptTokenizer.from_folder(folder)
        sharding = strategy.param_shardings(mesh) if strategy else None
        components = {}
        for seed, (name, preset) in enumerate(PRESETS["tiny"].items()):  # fixed seeds: the same weights everywhere
            spec = COMPONENTS[name]
            components[name] = Component(*random_component(name, spec.config.preset(preset), dtype, sharding, seed,
                                                           **component_options(name, attention_impl, quantize)))
        variant = conditioning.variant_of(components["transformer"].model.config.in_channels, None, declared, "tiny")
        return cls(**components, tokenizer=tokenizer, schedule=sampling.Schedule.dev(), kind="tiny", name="tiny",
                   strategy=strategy, mesh=mesh, variant=variant)

    def _widened(self, t: Component, adapters) -> Component:
        """`t` with img_in as wide as a structural-control LoRA among `adapters` needs (the new
        inputs at zero); the pipeline becomes a "control" one. `t` itself when none needs it."""
        from fluxjax.lora import adapters as lora

        if adapters.input_width is None:
            return t
        config = dataclasses.replace(t.model.config, in_channels=adapters.input_width)
        self.variant = conditioning.variant_of(config.in_channels, where=f"{self.name} with a control LoRA")
        _check_compatible(config, self.t5.model.config, self.clip.model.config, self.vae.model.config, self.variant)
        return Component(t.model.clone(config=config), lora.widen_input(t.params, adapters.input_width))

    def unload_lora(self) -> None:
        """Remove the live LoRAs (fused ones are part of the weights: reload the pipeline); a base
        model a live control LoRA widened is a base model again."""
        if self._params_before_loras is not None:
            self.transformer = Component(self.transformer.model, self._params_before_loras)
            if self._before_widening is not None:
                self.transformer, self.variant = self._before_widening, "base"
        self.loras, self.adapters, self._params_before_loras = [], None, None
        self._before_widening = None

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
        if output not in ("np", "pil"):
            raise UsageError(f"output must be 'np' or 'pil', got {output!r}")
        conditioning.check_use(self.variant, self.name, image=image, mask_image=mask_image,
                               reference_images=reference_images, control_image=control_image,
                               allow_references=allow_references)
        if reference_images is None and (max_area is not None or auto_resize is not None):
            raise UsageError("max_area and auto_resize apply to reference_images (Kontext) only")
        fill = self.variant == "fill"
        # resize serves control and reference images too: only without any image is it refused.
        other_images = control_image is not None or reference_images is not None
        images = self._condition_images(image, strength, mask_image, None if image is None and other_images else resize)
        controls = None if control_image is None else conditioning.load_images(control_image, resize, "control_image")
        text = _TextInputs.check(prompt, prompt_2, prompt_embeds, pooled_prompt_embeds, "prompt")
        if reference_images is not None:
            height, width = self._kontext_size(height, width, latents, max_area)
        size_from = images[0][0] if images is not None else None if controls is None else controls[0]
        prompts, batch, noise, height, width = self._inputs(prompt, height, width, seed, latents, text.batch, size_from)
        if prompts is not None:
            self._check_grammar(prompts)
        if sigmas is not None:
            sigmas = sampling.check_sigmas(sigmas)
            if num_steps is not None and num_steps != len(sigmas):
                raise UsageError(f"num_steps {num_steps} but {len(sigmas)} sigmas: leave num_steps unset with sigmas")
            num_steps = len(sigmas)
        num_steps, guidance, max_sequence_length = self.settings(num_steps, guidance, max_sequence_length)
        negative = _TextInputs.check(negative_prompt, negative_prompt_2, negative_prompt_embeds,
                                     negative_pooled_prompt_embeds, "negative_prompt", batch)
        true_cfg = _true_cfg(true_cfg_scale, negative.given, batch)
        seq_len = (height // 16) * (width // 16)
        schedule = self.schedule.sigmas(num_steps, seq_len) if sigmas is None else self.schedule.shift_sigmas(sigmas, seq_len)
        default_strength = 1.0 if fill else conditioning.DEFAULT_STRENGTH  # FluxFillPipeline's default is 1
        start = 0 if images is None else conditioning.strength_start(
            num_steps, default_strength if strength is None else strength)

        from tqdm import tqdm

        text_length = max_sequence_length if text.embeds is None else text.embeds[0].shape[1]
        inputs = dict(noise=sampling.pack(noise), img_ids=sampling.image_ids(batch, height, width),
                      txt_ids=sampling.text_ids(batch, text_length),
                      guidance=None if guidance is None else np.full((batch,), guidance, np.float32),
                      text=text.inputs(self.tokenizer, prompts, max_sequence_length, self.transformer.model.config))
        if true_cfg is not None:
            inputs["true_cfg"] = true_cfg
            inputs["negative"] = negative.inputs(self.tokenizer, negative.prompts, max_sequence_length,
                                                 self.transformer.model.config, text_length)
        if images is not None:
            pixels, masks = images
            inputs["pixels"] = conditioning.to_model_pixels(_per_image(pixels, batch, "image"))
            if masks is not None and fill:  # Fill's inputs: the image and its pixel mask
                inputs["variant"] = {"fill_pixels": inputs["pixels"], "fill_mask": _per_image(masks, batch, "mask_image")}
            elif masks is not None:
                inputs["mask"] = conditioning.mask_latents(_per_image(masks, batch, "mask_image"))
        if controls is not None:
            inputs["variant"] = {"control_pixels": conditioning.to_model_pixels(_per_image(controls, batch, "control_image"))}
        if reference_images is not None:
            inputs["variant"] = conditioning.kontext_inputs(reference_images, batch, auto_resize is not False, resize)
        if self.adapters is not None:
            from fluxjax.lora.adapters import image_scales

            strengths = [s for _, s in self.loras] if lora_scales is None else lora_scales
            inputs["lora_scales"] = image_scales(strengths, batch, self.adapters.count)
        elif lora_scales is not None:
            raise UsageError("lora_scales given, but no LoRA is loaded live (pipe.load_lora(..., fuse=False))")
        if self.strategy is not None:  # split along the data axes, padded to divide them
            inputs, _ = self.strategy.put_batch(inputs, self.mesh)
        context = self.strategy.activate(self.mesh) if self.strategy is not None else contextlib.nullcontext()

        steps = num_steps - start
        with context, tqdm(total=steps + 2, desc="encoding prompt", unit="stage", disable=not progress or None, leave=False) as bar:
            start_time = time.perf_counter()
            txt, vec = self._text(inputs["text"])
            cond = {}
            if true_cfg is not None:
                cond.update(zip(("neg_txt", "neg_vec"), self._text(inputs["negative"])), true_cfg=inputs["true_cfg"])
            img = inputs["noise"]
            if images is not None:
                image_latents = conditioning.encode_packed(self.vae.model, self.vae.params, inputs["pixels"])
                img = sampling.scale_noise(image_latents, inputs["noise"], schedule[start])
                cond["start"] = np.int32(start)
                if "mask" in inputs:
                    cond.update(image_latents=image_latents, noise=inputs["noise"], mask=inputs["mask"])
            if "variant" in inputs:  # the variant's extra channels or reference tokens
                cond.update(conditioning.encode_variant(self.vae.model, self.vae.params, inputs["variant"]))
            txt.block_until_ready()
            self.timings = {"encode": time.perf_counter() - start_time}
            bar.update(1)

            bar.set_description(f"denoising ({steps} steps)")
            start_time = time.perf_counter()
            with sampling.step_callback(lambda i: bar.update(1)):
                latents_out = sampling.denoise(
                    self.transformer.model, self.transformer.params, img, inputs["img_ids"], txt,
                    inputs["txt_ids"], vec, schedule, inputs["guidance"], report_steps=bool(progress),
                    adapters=None if self.adapters is None else self.adapters.tree, lora_scales=inputs.get("lora_scales"),
                    cond=sampling.Conditioning(**cond) if cond else None,
                )
                latents_out.block_until_ready()
            self.timings["denoise"] = time.perf_counter() - start_time
            if not progress:
                bar.update(steps)

            bar.set_description("decoding")
            start_time = time.perf_counter()
            # Checked before decoding too: the decoder clips, so an infinite latent would decode finite.
            check_output(_gather(latents_out)[:batch], "the denoised latents of images")
            out = _gather(decode_packed(self.vae.model, self.vae.params, latents_out, height, width))[:batch]
            check_output(out)
            self.timings["decode"] = time.perf_counter() - start_time
            bar.update(1)
        if output == "np":
            return out
        from PIL import Image

        return [Image.fromarray(u8) for u8 in to_uint8(out)]

    def _kontext_size(self, height, width, latents, max_area):
        """(height, width) of a call with reference images: the requested size (default the
        model's) at max_area pixels, as FluxKontextPipeline sets it; with `latents`, their size,
        which must be that size already (None, None then: `_inputs` reads it)."""
        area = conditioning.KONTEXT_MAX_AREA if max_area is None else max_area
        if latents is None:
            return conditioning.kontext_output_size(height or self.defaults.height, width or self.defaults.width, area)
        if np.ndim(latents) == 4:
            size = (np.shape(latents)[2] * 8, np.shape(latents)[3] * 8)
            h, w = conditioning.kontext_output_size(*size, area)
            if (h, w) != size:
                raise UsageError(f"latents are for {size[1]}x{size[0]} images, but with reference_images the output "
                                 f"is {w}x{h} (max_area={area}); pass max_area={size[0] * size[1]} or latents of that size")
        return height, width

    def _condition_images(self, image, strength, mask_image, resize):
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

    def _text(self, text: dict):
        """(txt, vec) from token ids ({"t5", "clip"}) or from given embeddings ({"txt", "vec"})."""
        if "txt" in text:  # host arrays, or already placed on the mesh by put_batch
            return jnp.asarray(text["txt"]), jnp.asarray(text["vec"])
        return self.encode(text["t5"], text["clip"])

    def encode(self, t5_ids, clip_ids):
        """Token ids (B, L) and (B, 77) -> txt (B, L, context_dim), vec (B, vec_dim) in the transformer's dtype.

        Sharded as the pipeline's strategy says when called inside `self.strategy.activate(self.mesh)`.
        """
        return encode_prompts_jit(self.t5.model, self.t5.params, self.clip.model, self.clip.params,
                                  t5_ids, clip_ids, self.transformer.model.dtype)

    def edit(self, image, source_prompt: str | Sequence[str], target_prompt: str | Sequence[str],
             num_steps: int | None = None, n_max: int | None = None, n_min: int | None = None,
             n_avg: int | None = None, source_guidance: float | None = None, target_guidance: float | None = None,
             seed: int | Sequence[int] = 0, resize: str | None = None, max_sequence_length: int | None = None,
             output: str = "pil"):
        """Edit real images with FlowEdit (fluxjax/sampling/flowedit.py): the source prompt describes the
        image, the target prompt what it should become; no inversion.

        image: a path, PIL image or array (H, W, 3) (uint8, or floats in [0, 1]), or a list of B of
            them of one size; sides multiples of 16 unless `resize` is "crop" or "scale"
            (fluxjax/pipeline/conditioning.py).
        source_prompt, target_prompt: a string (used for every image) or a list of B strings.
        num_steps (T), n_max, n_min, n_avg, source_guidance, target_guidance: default to the
            model's (flowedit.DEFAULTS; dev: 28, 24, 0, 1, 1.5, 5.5); guidance is refused by
            models without a guidance embedding.
        seed: an int s (image i uses s + i) or B ints; image i's noise depends on its seed only.
        output: "pil" (list of PIL images), "np" (float32 (B, H, W, 3) in [0, 1]) or "latents"
            (the edited latents, float32 (B, 16, H/8, W/8), NCHW as `pipe(latents=)` takes them).
        """
        from fluxjax.pipeline import conditioning
        from fluxjax.sampling import flowedit

        if output not in ("np", "pil", "latents"):
            raise UsageError(f"output must be 'np', 'pil' or 'latents', got {output!r}")
        flowedit.check_variant(self.variant, self.name)
        pixels = conditioning.load_images(image, resize, "image")
        batch, (height, width) = len(pixels), pixels[0].shape[:2]
        sources, targets = (_prompt_list(name, p, batch) for name, p in
                            (("source_prompt", source_prompt), ("target_prompt", target_prompt)))
        self._check_grammar(sources + targets)
        settings = flowedit.EditSettings(num_steps, n_max, n_min, n_avg, source_guidance, target_guidance).resolve(
            self.kind, self.transformer.model.config.guidance_embed)
        _, _, max_sequence_length = self.settings(max_sequence_length=max_sequence_length)
        sigmas = self.schedule.sigmas(settings.steps, (height // 16) * (width // 16))

        src_t5, src_clip = self.tokenizer(sources, max_sequence_length)
        tar_t5, tar_clip = self.tokenizer(targets, max_sequence_length)
        guidance = {f"guidance_{k}": None if g is None else np.full((batch,), g, np.float32)
                    for k, g in (("src", settings.source_guidance), ("tar", settings.target_guidance))}
        inputs = dict(pixels=conditioning.to_model_pixels(np.stack(pixels)), src_t5=src_t5, src_clip=src_clip,
                      tar_t5=tar_t5, tar_clip=tar_clip, img_ids=sampling.image_ids(batch, height, width),
                      txt_ids=sampling.text_ids(batch, src_t5.shape[1]), keys=flowedit.seed_keys(_seeds(seed, batch)),
                      **guidance)
        if self.strategy is not None:  # split along the data axes, padded to divide them
            inputs, _ = self.strategy.put_batch(inputs, self.mesh)
        context = self.strategy.activate(self.mesh) if self.strategy is not None else contextlib.nullcontext()
        with context:
            start = time.perf_counter()
            txt_src, vec_src = self.encode(inputs["src_t5"], inputs["src_clip"])
            txt_tar, vec_tar = self.encode(inputs["tar_t5"], inputs["tar_clip"])
            x_src = conditioning.encode_packed(self.vae.model, self.vae.params, inputs["pixels"])
            x_src.block_until_ready()
            self.timings = {"encode": time.perf_counter() - start}
            start = time.perf_counter()
            edited = flowedit.edit(self.transformer.model, self.transformer.params, x_src, inputs["img_ids"], txt_src,
                                   vec_src, txt_tar, vec_tar, inputs["txt_ids"], sigmas, inputs["keys"],
                                   inputs["guidance_src"], inputs["guidance_tar"], np.int32(settings.n_max),
                                   np.int32(settings.n_min), settings.n_avg)
            edited.block_until_ready()
            self.timings["edit"] = time.perf_counter() - start
            check_output(_gather(edited)[:batch], "the edited latents of images")
            if output == "latents":
                return np.asarray(sampling.unpack(_gather(edited)[:batch], height, width))
            start = time.perf_counter()
            images = _gather(decode_packed(self.vae.model, self.vae.params, edited, height, width))[:batch]
            check_output(images)
            self.timings["decode"] = time.perf_counter() - start
        if output == "np":
            return images
        from PIL import Image

        return [Image.fromarray(u8) for u8 in to_uint8(images)]

    def _check_grammar(self, prompts: list[str]) -> None:
        """An OutOfGrammarWarning (one line, giving the grammar) per distinct prompt that
        `self.grammar` refuses; the prompt still generates."""
        if self.grammar is None:
            return
        for prompt in dict.fromkeys(prompts):
            try:
                self.grammar(prompt)
            except ValueError as e:
                warnings.warn(f"{self.name} was trained on one grammar only, so the image may not show this prompt: {e}",
                              OutOfGrammarWarning, stacklevel=3)  # at the caller of the public method

    def _inputs(self, prompt, height, width, seed, latents, embeds_batch=None, image=None):
        """(prompts or None, B, noise (B, 16, H/8, W/8) float32, height, width), checked.

        B: the prompts' count (one string prompt is stretched to the batch of `latents`), or
        `embeds_batch` when the prompt comes as embeddings. image: the first conditioning image
        (uint8 (H, W, 3)), whose size the output takes.
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
        height = self.defaults.height if height is None else height
        width = self.defaults.width if width is None else width
        sampling.check_size(height, width)
        if latents is None:
            seeds = _seeds(seed, batch)
            latents = sampling.noise(seeds, height, width)
        return prompts, batch, jnp.asarray(latents, jnp.float32), height, width

    def settings(self, num_steps: int | None = None, guidance: float | None = None,
                 max_sequence_length: int | None = None) -> tuple[int, float | None, int]:
        """(num_steps, guidance, max_sequence_length) as a call with these arguments uses them:
        None filled in from the model's defaults; guidance None for models without a guidance
        embedding, which refuse one given (UsageError)."""
        d = self.defaults
        num_steps = d.num_steps if num_steps is None else num_steps
        max_sequence_length = d.max_sequence_length if max_sequence_length is None else max_sequence_length
        if not self.transformer.model.config.guidance_embed:
            if guidance is not None:
                raise UsageError(f"{self.name} ({self.kind}) has no guidance embedding: leave guidance unset")
            return num_steps, None, max_sequence_length
        guidance = d.guidance if guidance is None else guidance
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float, np.number)) or not np.isfinite(guidance):
            raise UsageError(f"guidance must be a finite number, got {guidance!r}")
        return num_steps, float(guidance), max_sequence_length


@partial(jit_with_rules, static_argnames=("model", "height", "width", "tiled"))
def decode_packed(model: AutoEncoder, params, packed, height: int, width: int, tiled: bool = False):
    """Packed latents (B, (H/16)(W/16), 64) -> images (B, H, W, 3) float32 in [0, 1].

    tiled: decode in tiles (fluxjax/models/tiled_decode.py: the same pixels, exact statistics)."""
    latents = sampling.unpack(packed, height, width).transpose(0, 2, 3, 1)  # NCHW -> NHWC
    if tiled:
        pixels = decode_tiled(model, params, latents)
    else:
        pixels = model.apply({"params": params}, latents, method="decode")
    return (jnp.clip(pixels, -1.0, 1.0) + 1.0) / 2.0


def _gather(x: jax.Array) -> np.ndarray:
    """A (possibly multi-host) global array as one host NumPy array, on every process."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) float in [0, 1] -> uint8, rounded to nearest as diffusers' numpy_to_pil does."""
    return np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)


def _seeds(seed, batch: int) -> list[int]:
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        seeds = [int(seed) + i for i in range(batch)]
    else:
        seeds = list(seed)
        if len(seeds) != batch or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in seeds):
            raise UsageError(f"seed must be an int or a list of {batch} ints, got {seed!r}")
    for s in seeds:
        sampling.check_seed("seed", int(s))
    return [int(s) for s in seeds]


@dataclass(frozen=True)
class _TextInputs:
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
    def check(cls, prompt, prompt_2, embeds, pooled, name: str, batch: int | None = None) -> "_TextInputs":
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
        if batch is None:  # the prompt itself: checked and counted by FluxPipeline._inputs
            prompts_2 = None if prompt_2 is None else _prompt_list(f"{name}_2", prompt_2, 1 if isinstance(prompt, str)
                                                                     else len(prompt))
            return cls(None, prompts_2, None, None)
        prompts = _prompt_list(name, prompt, batch)
        return cls(prompts, None if prompt_2 is None else _prompt_list(f"{name}_2", prompt_2, batch), None, batch)

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


def _true_cfg(scale, negative_given: bool, batch: int) -> np.ndarray | None:
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


def _per_image(items: list[np.ndarray], batch: int, name: str) -> np.ndarray:
    """(B, ...) stacked from one item (used for every image) or B of them."""
    if len(items) == 1:
        return np.repeat(items[0][None], batch, axis=0)
    if len(items) != batch:
        raise UsageError(f"{len(items)} {name}s for {batch} images (give one, or one per image)")
    return np.stack(items)


def _prompt_list(name: str, prompt, batch: int) -> list[str]:
    """`prompt` (a string, used for every image, or a list of `batch` strings) as a checked list."""
    prompts = [prompt] * batch if isinstance(prompt, str) else list(prompt)
    if len(prompts) != batch:
        raise UsageError(f"{name}: {len(prompts)} prompts for {batch} images")
    for i, p in enumerate(prompts):
        check_prompt(name if isinstance(prompt, str) else f"{name} {i}", p)
    return prompts


def check_output(images: np.ndarray, what: str = "images") -> None:
    """Raise NonFiniteError when any of `images` (B, ...) holds NaN or infinity, naming which.

    A non-finite value (from non-finite weights or inputs) would otherwise be written as a black
    or saturated PNG and counted as done.
    """
    bad = [i for i in range(images.shape[0]) if not np.isfinite(images[i]).all()]
    if bad:
        raise NonFiniteError(f"{what} {', '.join(map(str, bad))} of the batch came out with NaN or infinite values "
                             "(non-finite weights or inputs); nothing is written for them")


def _default_schedule(kind: str) -> sampling.Schedule:
    return sampling.Schedule.schnell() if kind == "schnell" else sampling.Schedule.dev()


def check_source(source: str) -> None:
    """Raise UsageError unless `source` is "tiny", a packaged model's name, a folder, or shaped like
    a hub repo id ("org/name")."""
    if source == "tiny" or source in PACKAGED_MODELS or os.path.isdir(source):
        return
    if os.path.exists(source):
        raise UsageError(f"{source}: expected a pipeline folder (the hub's diffusers layout), not a file; "
                         "pass a BFL transformer file as transformer=")
    if source.count("/") != 1 or source.startswith((".", "/", "~")):
        raise UsageError(f"{source}: no such folder")


def _resolve_source(source: str) -> str:
    """A packaged model's folder; a local folder as is; otherwise a hub repo id through huggingface_hub."""
    check_source(source)
    if source in PACKAGED_MODELS:
        return packaged_folder(source)
    if os.path.isdir(source):
        return source
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UsageError(f"{source}: no such folder (and huggingface_hub is not installed to download it)") from None
    try:
        return snapshot_download(source)
    except Exception as e:  # network, auth, unknown repo: all are the user's to fix
        raise UsageError(f"{source}: no such folder, and downloading it from the hub failed: {e}") from None


def local_snapshot(repo: str) -> str | None:
    """`repo`'s snapshot in the local hub cache, or None (never downloads)."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo, local_files_only=True)
    except Exception:  # not cached, or huggingface_hub missing: the caller takes another model
        return None


def default_source() -> tuple[str, str | None]:
    """(source, notice): the model loaded when none is named (`fluxjax generate` without --model,
    `FluxPipeline.from_pretrained()`). FLUX.1-schnell, else FLUX.1-dev, from the local hub cache
    (never downloaded), with notice None; else "shapes", with SHAPES_NOTICE: one line for the
    user saying so and how to get the real weights."""
    for repo in (SCHNELL_REPO, DEV_REPO):
        folder = local_snapshot(repo)
        if folder is not None:
            return folder, None
    return "shapes", SHAPES_NOTICE


# the packaged models' folders: model NAME's is fluxjax/NAME/weights, beside the code that made it
WEIGHTS = importlib.resources.files("fluxjax")


def packaged_folder(name: str) -> str | None:
    """The folder of the packaged model `name` (one of PACKAGED_MODELS), None for other names;
    UsageError when this installation lacks it."""
    if name not in PACKAGED_MODELS:
        return None
    folder = WEIGHTS / name / "weights"
    if not folder.is_dir():
        raise UsageError(f"the built-in model {name!r} is missing from this installation ({folder}): reinstall fluxjax")
    return os.fspath(folder)  # a wheel installs unpacked: a real folder on disk


def _is_packaged(root: str, name: str) -> bool:
    """Whether folder `root` is the packaged model `name` (by name or by any path to it)."""
    folder = WEIGHTS / name / "weights"
    return folder.is_dir() and os.path.samefile(root, os.fspath(folder))


def folder_defaults(folder: str, guidance_embed: bool) -> Defaults:
    """The defaults of a pipeline loaded from `folder` whose transformer has (or lacks) a
    guidance embedding: FLUX.1-dev's (or -schnell's), replaced key by key by those of
    folder/defaults.json when there is one: a JSON object with any of "height", "width"
    (multiples of 16), "num_steps", "max_sequence_length" (integers >= 1) and "guidance" (a
    number; null for a model without a guidance embedding). A packaged model states there the
    settings at which it was measured. UsageError naming the file and key otherwise."""
    return _with_overrides(folder, _read_defaults(folder), guidance_embed)


def _read_defaults(folder: str) -> dict:
    """folder/defaults.json's settings, checked key by key ({} when there is no such file)."""
    path = os.path.join(folder, DEFAULTS_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            values = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: not a readable JSON file ({' '.join(str(e).split())})") from None
    keys = [f.name for f in dataclasses.fields(Defaults)]
    if not isinstance(values, dict):
        raise UsageError(f"{path}: expected a JSON object with keys among {', '.join(keys)}")
    for key, value in values.items():
        if key not in keys:
            raise UsageError(f"{path}: unknown key {key!r} (expected any of {', '.join(keys)})")
        if key in ("height", "width"):
            sampling.check_dimension(f"{path}: {key}", value)
        elif key == "guidance":
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not np.isfinite(value)):
                raise UsageError(f"{path}: guidance must be a finite number or null, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{path}: {key} must be an integer >= 1, got {value!r}")
    return {k: float(v) if k == "guidance" and v is not None else v for k, v in values.items()}


def _with_overrides(folder: str, overrides: dict, guidance_embed: bool, base: Defaults | None = None) -> Defaults:
    """`base` (default: the kind's defaults) replaced by `overrides` (from _read_defaults), the
    guidance checked against the transformer."""
    base = DEFAULTS["dev" if guidance_embed else "schnell"] if base is None else base
    defaults = dataclasses.replace(base, **overrides)
    path = os.path.join(folder, DEFAULTS_FILE)
    if defaults.guidance is not None and not guidance_embed:
        raise UsageError(f"{path}: guidance {defaults.guidance} for a transformer without a guidance embedding "
                         "(set it to null)")
    if defaults.guidance is None and guidance_embed:
        raise UsageError(f"{path}: guidance null for a transformer with a guidance embedding (give a number)")
    return defaults


def _pipeline_class(root: str) -> str | None:
    """model_index.json's `_class_name` in a pipeline folder (hub or converted), None without that file."""
    path = os.path.join(root, "model_index.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get("_class_name")


def _check_compatible(t: FluxConfig, t5: T5Config, clip: CLIPConfig, vae: AutoEncoderConfig, variant: str = "base") -> None:
    problems = []
    if t.context_in_dim != t5.d_model:
        problems.append(f"transformer context_in_dim {t.context_in_dim} != T5 d_model {t5.d_model}")
    if t.vec_in_dim != clip.hidden_size:
        problems.append(f"transformer vec_in_dim {t.vec_in_dim} != CLIP hidden_size {clip.hidden_size}")
    if t.out_channels != vae.z_channels * 4:
        problems.append(f"transformer out_channels {t.out_channels} != 4 x VAE z_channels {vae.z_channels}")
    extra = conditioning.EXTRA_CHANNELS.get(variant, 0)
    if t.in_channels != vae.z_channels * 4 + extra:
        problems.append(f"transformer in_channels {t.in_channels} != 4 x VAE z_channels {vae.z_channels}"
                        + (f" + {extra} ({variant})" if extra else ""))
    if vae.downsample_factor != 8:
        problems.append(f"VAE downsamples by {vae.downsample_factor}, FLUX needs 8")
    if problems:
        raise UsageError("components do not fit together: " + "; ".join(problems))
