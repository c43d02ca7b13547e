"""`fluxjax generate PROMPT [--model SRC] [--out FILE] [...]`: one image (or a few) from a prompt.

The PNG carries its recipe in text chunks (prompt, seed, steps, guidance, size, model), and is
written under a temporary name and renamed, so FILE is either complete or absent (fluxjax/images.py);
a temporary file a killed run left for FILE is removed, and reported, by the next run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from fluxjax.pipeline import request
from fluxjax.errors import UsageError
from fluxjax.images import remove_temporaries, save_png
from fluxjax.models.attention import ATTENTION_IMPLEMENTATIONS

TINY_NOTICE = (
    "using the tiny preset: a small model with RANDOM weights, so the image is noise. For real images, "
    "download FLUX.1-schnell on a machine with network (huggingface_hub.snapshot_download("
    "'black-forest-labs/FLUX.1-schnell')) and pass --model PATH (or leave it in the hub cache)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="a hub-layout folder, a hub repo id, 'shapes' (the built-in model) or 'tiny' (random "
                             "weights, for tests) (default: FLUX.1-schnell, else -dev, from the local hub cache when "
                             "present, else shapes)")
    parser.add_argument("--transformer", default=None, help="a BFL transformer file (flux1-*.safetensors, fp8 or .gguf) replacing the model's")
    parser.add_argument("--vae", default=None, help="a BFL autoencoder file (ae.safetensors) replacing the model's")
    parser.add_argument("--out", default="flux.png", help="the PNG to write (default: flux.png)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--attention", default="auto", choices=ATTENTION_IMPLEMENTATIONS,
                        help="attention kernel (auto: fluxjax's CPU kernel on a CPU, XLA elsewhere)")
    parser.add_argument("--sharding", default=None,
                        help="a strategy of fluxjax/configs/sharding (dp, fsdp, tp, fsdp_tp) or a strategy file (default: one device)")
    add_memory_arguments(parser)
    request.add_arguments(parser.add_argument_group("the request (fluxjax/pipeline/request.py; img2img, inpainting, "
                                                    "references, control, true CFG)"), "generate")


def add_memory_arguments(parser: argparse.ArgumentParser) -> None:
    """--quantize and --residency of generate, edit and batch (FluxPipeline.from_pretrained's quantize
    and residency)."""
    from fluxjax.models.quantize import MODES
    from fluxjax.pipeline.residency import MODES as RESIDENCY

    parser.add_argument("--quantize", default=None, choices=tuple(MODES),
                        help="hold the transformer's and T5's Linears as int8 or fp8 weights with a scale per "
                             "output channel (about half the memory of bf16; error in docs/quantization.md)")
    parser.add_argument("--residency", default="auto", choices=RESIDENCY,
                        help="where T5 and CLIP live: auto (default: on the devices, or on the host CPU when they do "
                             "not fit beside the transformer, said in one line), device, or host")


def _check(args) -> None:
    """Everything that can be checked before minutes of loading. args.request becomes the
    request as it will run (request.check: with --image and no --height/--width, the image's
    size); args.height and args.width its size, for the size limit (_check_size)."""
    args.request = request.check(request.from_args(args, "generate"), "generate", name=request.flag)
    args.height, args.width = args.request.get("height"), args.request.get("width")
    check_output_and_model(args)
    if args.model is not None:  # a FLUX.2 folder refuses FLUX.1's options here, not after loading
        given = {**args.request, **{k: v for k in ("sharding", "transformer", "vae", "quantize")
                                    if (v := getattr(args, k)) is not None}}
        _pipeline_class(args.model).check_options(args.model, given,
                                                  lambda key: request.flag(key) if key in request.BY_NAME else
                                                  "--" + key)


def _pipeline_class(model: str) -> type:
    """The pipeline class `model` loads as (pipeline.pipeline_for)."""
    from fluxjax.pipeline.pipeline import pipeline_for

    return pipeline_for(model)


def check_output_and_model(args) -> None:
    """--out, --model, --sharding, --transformer, --vae (shared with `fluxjax edit`), before loading."""
    from fluxjax.pipeline.sources import check_source
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
    """--lora's (file, scale) pairs, as request.from_args parsed them (`fluxjax edit` takes none)."""
    return list(args.request.get("loras", ()))


def choose_model(model: str | None) -> tuple[str, str | None]:
    """(model, notice): --model as given, or sources.default_source() without it; notice is the
    one line to print first (the tiny preset's, or why the shapes model was taken), or None."""
    from fluxjax.pipeline.sources import default_source

    model, notice = (model, None) if model is not None else default_source()
    return model, TINY_NOTICE if model == "tiny" else notice


def model_settings(model: str, transformer_file: str | None = None):
    """(FluxConfig, pipeline.Defaults) a pipeline from `model` will run, from its small files only
    (before loading): the tiny preset's; else the folder's (a packaged model's by name) transformer
    config and defaults.json (folder_defaults); else FLUX.1-dev's."""
    from fluxjax.plan.limits import transformer_config
    from fluxjax.pipeline.defaults import DEFAULTS, folder_defaults
    from fluxjax.pipeline.sources import packaged_folder

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
    limit = SizeLimit(cfg, args.request.get("max_sequence_length", defaults.max_sequence_length), batch, args.dtype,
                      strategy, jax.devices() if strategy is not None else jax.devices()[:1])
    references = args.request.get("references", ())  # `fluxjax edit` takes none
    if references and _pipeline_class(model).kontext_references:
        args.height, args.width, args.max_area = kontext_call_size(args.height, args.width, defaults.height,
                                                                   defaults.width)
    limit.check(name, args.height or defaults.height, args.width or defaults.width,
                kontext_reference_sizes(references, request.flag("references")))


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
                                        quantize=args.quantize, residency=args.residency)
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
    # The size _check_size chose (Kontext), and the strength used, recorded in the PNG.
    values = {**args.request, "height": args.height, "width": args.width}
    if "image" in values and "strength" not in values:
        values["strength"] = pipe.default_strength
    kontext = {"max_area": args.max_area} if "references" in values and pipe.kontext_references else {}
    kw = request.keywords(values)
    (image,) = pipe(kw.pop("prompt"), output="pil", progress=True, **kw, **kontext)
    timings.update(pipe.timings)

    if host != 0:
        return 0
    steps = len(values["sigmas"]) if "sigmas" in values else values.get("steps")
    steps, guidance, _ = pipe.settings(steps, values.get("guidance"))
    text = request.recipe_text({**values, "steps": steps, "guidance": guidance}, image.width, image.height, pipe.name)
    done = save(image, args.out, text, timings)
    print(f"wrote {args.out} ({image.width}x{image.height}, {pipe.name}, {steps} steps) {done}", file=sys.stderr)
    return 0
