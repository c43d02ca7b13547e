"""`fluxjax generate PROMPT [--model SRC] [--out FILE] [...]`: one image (or a few) from a prompt.

The PNG carries its recipe in text chunks (prompt, seed, steps, guidance, size, model), and is
written under a temporary name and renamed, so FILE is either complete or absent (fluxjax/images.py);
a temporary file a killed run left for FILE is removed, and reported, by the next run.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

from fluxjax.errors import UsageError
from fluxjax.images import conditioning_text, png_text, remove_temporaries, save_png
from fluxjax.models.layers import ATTENTION_IMPLEMENTATIONS
from fluxjax.sampling.sampler import SEEDS, check_dimension, check_seed

TINY_NOTICE = (
    "using the tiny preset: a small model with RANDOM weights, so the image is noise. For real images, "
    "download FLUX.1-schnell on a machine with network (huggingface_hub.snapshot_download("
    "'black-forest-labs/FLUX.1-schnell')) and pass --model PATH (or leave it in the hub cache)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="what to draw")
    parser.add_argument("--model", default=None,
                        help="a hub-layout folder, a hub repo id, 'shapes' (the built-in model) or 'tiny' (random "
                             "weights, for tests) (default: FLUX.1-schnell, else -dev, from the local hub cache when "
                             "present, else shapes)")
    parser.add_argument("--transformer", default=None, help="a BFL transformer file (flux1-*.safetensors, fp8 or .gguf) replacing the model's")
    parser.add_argument("--vae", default=None, help="a BFL autoencoder file (ae.safetensors) replacing the model's")
    parser.add_argument("--out", default="flux.png", help="the PNG to write (default: flux.png)")
    parser.add_argument("--height", type=int, default=None, help="pixels, a multiple of 16 (default: the model's)")
    parser.add_argument("--width", type=int, default=None, help="pixels, a multiple of 16 (default: the model's)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's: schnell 4, dev 28, or its folder's defaults.json)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance strength, dev only (default 3.5)")
    parser.add_argument("--seed", type=int, default=0, help=f"0 to {SEEDS - 1} (default 0)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--attention", default="auto", choices=ATTENTION_IMPLEMENTATIONS,
                        help="attention kernel (auto: fluxjax's CPU kernel on a CPU, XLA elsewhere)")
    parser.add_argument("--sharding", default=None,
                        help="a strategy of fluxjax/configs/sharding (dp, fsdp, tp, fsdp_tp) or a strategy file (default: one device)")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                        help="a LoRA .safetensors (diffusers/PEFT, kohya, ComfyUI, XLabs or BFL control) fused into the "
                             "transformer at strength SCALE (default 1); repeatable")
    add_quantize_argument(parser)
    add_conditioning_arguments(parser)


def add_quantize_argument(parser: argparse.ArgumentParser) -> None:
    """--quantize of generate, edit and batch (FluxPipeline.from_pretrained's quantize)."""
    from fluxjax.models.quantize import MODES

    parser.add_argument("--quantize", default=None, choices=tuple(MODES),
                        help="hold the transformer's and T5's Linears as int8 or fp8 weights with a scale per "
                             "output channel (about half the memory of bf16; error in docs/quantization.md)")


def add_conditioning_arguments(parser: argparse.ArgumentParser) -> None:
    """The image-conditioning and guidance flags; each forwards to the FluxPipeline keyword of its name."""
    from fluxjax.pipeline.conditioning import RESIZE_POLICIES

    group = parser.add_argument_group("conditioning (img2img, inpainting, references, control, true CFG)")
    group.add_argument("--image", default=None, help="start from this image (img2img; the output has its size)")
    group.add_argument("--strength", type=float, default=None,
                       help="with --image: how much of the schedule runs, in (0, 1] (default 0.6; 1 = from noise)")
    group.add_argument("--mask", default=None, help="with --image: inpaint where this mask is white (the image's size)")
    group.add_argument("--resize", default=None, choices=RESIZE_POLICIES,
                       help="bring an --image (and --mask) whose sides are not multiples of 16 to them")
    group.add_argument("--reference", action="append", default=[], metavar="IMAGE",
                       help="a reference image (Kontext checkpoints); repeatable")
    group.add_argument("--control", default=None, help="a control image (Canny/Depth control checkpoints)")
    group.add_argument("--negative-prompt", default=None, help="true classifier-free guidance away from this prompt")
    group.add_argument("--true-cfg", type=float, default=None, help="with --negative-prompt: the true CFG scale (> 1)")
    group.add_argument("--prompt-2", default=None, help="the T5 prompt, when it should differ from PROMPT (CLIP's)")
    group.add_argument("--sigmas", default=None, metavar="S1,S2,...",
                       help="a custom schedule: decreasing timesteps in (0, 1], comma-separated (sets the step count)")


def _check(args) -> None:
    """Everything that can be checked before minutes of loading."""
    from fluxjax.pipeline.text import check_prompt

    check_prompt("PROMPT", args.prompt)
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    for name in ("height", "width"):
        if getattr(args, name) is not None:
            check_dimension(f"--{name}", getattr(args, name))
    check_seed("--seed", args.seed)
    if args.guidance is not None and not math.isfinite(args.guidance):
        raise UsageError(f"--guidance must be a finite number, got {args.guidance}")
    check_conditioning(args)
    check_output_and_model(args)


def check_conditioning(args) -> None:
    """The conditioning flags that can be checked before loading (conditioning.check_request).

    With --image and no --height/--width, those become the image's size (checked against the
    devices' limit); --sigmas becomes args.sigma_values.
    """
    from fluxjax.pipeline.conditioning import check_request

    flags = {"references": "--reference", "true_cfg": "--true-cfg"}
    sigmas = None
    if args.sigmas is not None:
        try:
            sigmas = [float(v) for v in args.sigmas.split(",")]
        except ValueError:
            raise UsageError(f"--sigmas {args.sigmas!r}: expected comma-separated numbers, e.g. 1,0.75,0.5,0.25") from None
    args.height, args.width, args.sigma_values = check_request(
        "", lambda key: flags.get(key, "--" + key.replace("_", "-")), image=args.image, strength=args.strength,
        mask=args.mask, resize=args.resize, references=args.reference, control=args.control,
        negative_prompt=args.negative_prompt, true_cfg=args.true_cfg, prompt_2=args.prompt_2, sigmas=sigmas,
        steps=args.steps, height=args.height, width=args.width)


def conditioning_kwargs(args) -> dict:
    """The pipeline keywords of the conditioning flags that were given."""
    kw = dict(image=args.image, strength=args.strength, mask_image=args.mask, resize=args.resize,
              reference_images=args.reference or None, control_image=args.control,
              negative_prompt=args.negative_prompt, true_cfg_scale=args.true_cfg, prompt_2=args.prompt_2,
              sigmas=getattr(args, "sigma_values", None))
    if args.image is not None and args.strength is None:  # recorded in the PNG as the value used
        from fluxjax.pipeline.conditioning import DEFAULT_STRENGTH

        kw["strength"] = DEFAULT_STRENGTH
    return {k: v for k, v in kw.items() if v is not None}


def check_output_and_model(args) -> None:
    """--out, --model, --sharding, --transformer, --vae (shared with `fluxjax edit`), before loading."""
    from fluxjax.pipeline.pipeline import check_source
    from fluxjax.parallel.strategies import Strategy

    if not args.out.lower().endswith(".png"):
        raise UsageError(f"--out {args.out}: the output is a PNG, give a name ending in .png")
    if os.path.isdir(args.out):
        raise UsageError(f"--out {args.out}: is a folder; give the PNG's file name")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise UsageError(f"--out {args.out}: folder {folder} does not exist")
    if args.model is not None:
        check_source(args.model)
    if args.sharding is not None:
        Strategy.load(args.sharding)
    for name in ("transformer", "vae"):
        path = getattr(args, name)
        if path is not None and not os.path.isfile(path):
            raise UsageError(f"--{name} {path}: no such file")
    for path, _ in _loras(args):
        if not os.path.isfile(path):
            raise UsageError(f"--lora {path}: no such file")


def _loras(args) -> list[tuple[str, float]]:
    from fluxjax.lora.adapters import parse_lora_arg

    return [parse_lora_arg(x) for x in getattr(args, "lora", None) or ()]  # `fluxjax edit` takes no --lora


def choose_model(model: str | None) -> tuple[str, str | None]:
    """(model, notice): --model as given, or pipeline.default_source() without it; notice is the
    one line to print first (the tiny preset's, or why the shapes model was taken), or None."""
    from fluxjax.pipeline.pipeline import default_source

    model, notice = (model, None) if model is not None else default_source()
    return model, TINY_NOTICE if model == "tiny" else notice


def model_settings(model: str, transformer_file: str | None = None):
    """(FluxConfig, pipeline.Defaults) a pipeline from `model` will run, from its small files only
    (before loading): the tiny preset's; else the folder's (a packaged model's by name) transformer
    config and defaults.json (folder_defaults); else FLUX.1-dev's."""
    from fluxjax.plan.limits import transformer_config
    from fluxjax.pipeline.pipeline import DEFAULTS, folder_defaults, packaged_folder

    folder = packaged_folder(model) or model
    cfg = transformer_config(folder, transformer_file)
    return cfg, DEFAULTS["tiny"] if model == "tiny" else folder_defaults(folder, cfg.guidance_embed)


def _check_size(args, model: str, batch: int = 1, name: str = "--width/--height") -> None:
    """Refuse, before loading, a size whose denoising step (`batch` rows) cannot fit the devices
    (fluxjax/plan/limits.py); `fluxjax edit` passes its image's size as args.height, args.width.

    With --reference (Kontext), the size made is the one asked, or diffusers' default
    (conditioning.kontext_call_size: args.height, args.width and args.max_area are set to it),
    and each reference's tokens count too.
    """
    import jax

    from fluxjax.pipeline.conditioning import kontext_call_size, kontext_reference_sizes
    from fluxjax.plan.limits import SizeLimit
    from fluxjax.parallel.strategies import Strategy

    cfg, defaults = model_settings(model, args.transformer)
    strategy = Strategy.load(args.sharding) if args.sharding is not None else None
    limit = SizeLimit(cfg, defaults.max_sequence_length, batch, args.dtype,
                      strategy, jax.devices() if strategy is not None else jax.devices()[:1])
    references = getattr(args, "reference", None) or []  # `fluxjax edit` takes none
    if references:
        args.height, args.width, args.max_area = kontext_call_size(args.height, args.width, defaults.height,
                                                                   defaults.width)
    limit.check(name, args.height or defaults.height, args.width or defaults.width,
                kontext_reference_sizes(references, "--reference"))


def load_pipeline(args, command: str, rows: int = 1, size_name: str = "--width/--height"):
    """The start `fluxjax generate` and `fluxjax edit` share, after their checks: join the
    processes, remove host 0's leftover temporaries of --out, choose the model, refuse a size
    whose step (`rows` transformer rows) cannot fit, load. Returns (host, pipe, timings)."""
    from fluxjax.parallel import distributed
    from fluxjax.pipeline.pipeline import FluxPipeline

    host, _ = distributed.initialize()  # several processes: each joins; all compute, host 0 writes
    if host == 0:
        remove_temporaries(*os.path.split(os.path.abspath(args.out)))
    model, notice = choose_model(args.model)
    _check_size(args, model, rows, size_name)
    if notice is not None and host == 0:
        print(f"fluxjax {command}: {notice}", file=sys.stderr)

    start = time.perf_counter()
    print(f"loading {model} ...", file=sys.stderr, flush=True)
    pipe = FluxPipeline.from_pretrained(model, dtype=args.dtype, sharding=args.sharding, transformer=args.transformer,
                                        vae=args.vae, attention_impl=args.attention, loras=_loras(args), fuse=True,
                                        quantize=args.quantize)
    return host, pipe, {"load": time.perf_counter() - start}


def save(image, path: str, text: dict[str, str], timings: dict[str, float]) -> str:
    """Write the PNG (fluxjax/images.py); return "in T s: stage s, ..." for the closing line."""
    start = time.perf_counter()
    try:
        save_png(image, path, text)
    except OSError as e:  # a full disk, a quota, a folder made read-only meanwhile: save_png removed its temporary
        raise UsageError(f"{path}: could not write the PNG ({e.strerror or e}); no file was left") from None
    timings["save"] = time.perf_counter() - start
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in timings.items())
    return f"in {sum(timings.values()):.1f} s: {stages}"


def run(args) -> int:
    _check(args)
    host, pipe, timings = load_pipeline(args, "generate")
    cond = conditioning_kwargs(args)
    kontext = {"max_area": args.max_area} if args.reference else {}  # the size _check_size chose
    (image,) = pipe(args.prompt, height=args.height, width=args.width, num_steps=args.steps, guidance=args.guidance,
                    seed=args.seed, output="pil", progress=True, **cond, **kontext)
    timings.update(pipe.timings)

    if host != 0:
        return 0
    steps = len(cond["sigmas"]) if "sigmas" in cond else args.steps
    steps, guidance, _ = pipe.settings(steps, args.guidance)
    text = png_text(args.prompt, args.seed, steps, guidance, image.width, image.height, pipe.name, _loras(args))
    text.update(conditioning_text(**cond))
    done = save(image, args.out, text, timings)
    print(f"wrote {args.out} ({image.width}x{image.height}, {pipe.name}, {steps} steps) {done}", file=sys.stderr)
    return 0
