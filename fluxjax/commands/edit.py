"""`fluxjax edit IN.png --source-prompt "..." --target-prompt "..." --out OUT.png [...]`: FlowEdit.

Edits a real image towards the target prompt without inverting it to noise (fluxjax/sampling/flowedit.py).
Everything that can be checked is checked before loading (the image's size is read from its
header); on bad input the command prints one line, exits 2 and writes nothing. The PNG records
the edit's settings and the source image's name and SHA-256 in text chunks (fluxjax/images.py),
written under a temporary name and renamed, as `fluxjax generate` does.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys

from fluxjax.pipeline import request
from fluxjax.errors import UsageError
from fluxjax.models.attention import ATTENTION_IMPLEMENTATIONS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fluxjax.commands.generate import add_memory_arguments

    parser.add_argument("image", help="the image to edit (PNG, JPEG, ...), sides multiples of 16 unless --resize")
    parser.add_argument("--out", default="edited.png", help="the PNG to write (default: edited.png)")
    request.add_arguments(parser, "edit")
    parser.add_argument("--model", default=None,
                        help="a hub-layout folder, a hub repo id, or 'tiny' (default: FLUX.1-schnell from the local "
                             "hub cache when present, else tiny)")
    parser.add_argument("--transformer", default=None, help="a BFL transformer file (flux1-*.safetensors, fp8 or .gguf) replacing the model's")
    parser.add_argument("--vae", default=None, help="a BFL autoencoder file (ae.safetensors) replacing the model's")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--attention", default="auto", choices=ATTENTION_IMPLEMENTATIONS,
                        help="attention kernel (auto: fluxjax's CPU kernel on a CPU, XLA elsewhere)")
    parser.add_argument("--sharding", default=None,
                        help="a strategy of fluxjax/configs/sharding (dp, fsdp, tp, fsdp_tp) or a strategy file (default: one device)")
    add_memory_arguments(parser)


def _check(args) -> tuple[int, int]:
    """Everything that can be checked before loading; returns the (height, width) the edit runs at."""
    from fluxjax.commands.generate import check_output_and_model
    from fluxjax.pipeline.conditioning import image_size

    args.request = request.check(request.from_args(args, "edit"), "edit", name=request.flag)
    # The model's defaults fill in the rest after loading (flowedit.EditSettings.resolve checks again).
    if args.n_max is not None and args.steps is not None and args.n_max > args.steps:
        raise UsageError(f"n_max {args.n_max} is more than the {args.steps} steps of the schedule (n_max <= steps)")
    if args.n_min is not None and args.n_max is not None and args.n_min > args.n_max:
        raise UsageError(f"n_min {args.n_min} is more than n_max {args.n_max} (n_min <= n_max)")
    check_output_and_model(args)
    return image_size(args.image, args.resize, "image")


def check_model(args) -> None:
    """Refuse, before loading, a model FlowEdit cannot run (flowedit.check_variant), read from its
    transformer's config: a Fill or control model has a wider input."""
    from fluxjax.commands.generate import choose_model, model_settings
    from fluxjax.pipeline.conditioning import variant_of
    from fluxjax.sampling.flowedit import check_variant

    from fluxjax.pipeline.pipeline import FluxPipeline, pipeline_for

    model = choose_model(args.model)[0]
    if pipeline_for(model) is not FluxPipeline:  # FLUX.2: its settings are the library's for now
        raise UsageError(f"--model {model}: a FLUX.2 folder; `fluxjax edit` runs FLUX.1 models for now (FLUX.2's "
                         "FlowEdit is Flux2Pipeline.edit in Python)")
    cfg, _ = model_settings(model, args.transformer)
    check_variant(variant_of(cfg.in_channels), model)


def run(args) -> int:
    from fluxjax.commands.generate import load_pipeline, save
    from fluxjax.sampling.flowedit import EditSettings
    from fluxjax.images import edit_text

    args.height, args.width = _check(args)
    check_model(args)
    # One edit step runs the transformer on 2 x n_avg rows (source and target, each draw).
    host, pipe, timings = load_pipeline(args, "edit", rows=2 * (args.n_avg or 1), size_name=f"image {args.image}")
    settings = EditSettings(args.steps, args.n_max, args.n_min, args.n_avg, args.source_guidance,
                            args.target_guidance).resolve(pipe.kind, pipe.transformer.model.config.guidance_embed)
    with open(args.image, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    (image,) = pipe.edit(args.image, args.source_prompt, args.target_prompt, num_steps=settings.steps,
                         n_max=settings.n_max, n_min=settings.n_min, n_avg=settings.n_avg,
                         source_guidance=settings.source_guidance, target_guidance=settings.target_guidance,
                         seed=args.seed, resize=args.resize, max_sequence_length=args.max_sequence_length)
    timings.update(pipe.timings)

    if host != 0:
        return 0
    text = edit_text(os.path.basename(args.image), digest, args.source_prompt, args.target_prompt, args.seed, settings,
                     image.width, image.height, pipe.name, args.resize)
    done = save(image, args.out, text, timings)
    print(f"wrote {args.out} ({image.width}x{image.height}, {pipe.name}, FlowEdit: {settings.n_max - settings.n_min} "
          f"edit and {settings.n_min} sampling steps of {settings.steps}) {done}", file=sys.stderr)
    return 0
