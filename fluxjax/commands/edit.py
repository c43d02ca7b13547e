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
import math
import os
import sys

from fluxjax.errors import UsageError
from fluxjax.models.layers import ATTENTION_IMPLEMENTATIONS
from fluxjax.sampling.sampler import SEEDS, check_seed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fluxjax.commands.generate import add_quantize_argument
    from fluxjax.pipeline.conditioning import RESIZE_POLICIES

    parser.add_argument("image", help="the image to edit (PNG, JPEG, ...), sides multiples of 16 unless --resize")
    parser.add_argument("--source-prompt", required=True, help="what the image shows")
    parser.add_argument("--target-prompt", required=True, help="what it should show after the edit")
    parser.add_argument("--out", default="edited.png", help="the PNG to write (default: edited.png)")
    parser.add_argument("--steps", type=int, default=None, help="T, the schedule's steps (default: dev 28, schnell 4)")
    parser.add_argument("--n-max", type=int, default=None,
                        help="steps edited, from noise level t_(T - n_max) on (default: dev 24, schnell 3)")
    parser.add_argument("--n-min", type=int, default=None,
                        help="last steps run as plain sampling of the target (default 0)")
    parser.add_argument("--n-avg", type=int, default=None, help="noise draws averaged per step (default 1)")
    parser.add_argument("--source-guidance", type=float, default=None, help="dev only (default 1.5)")
    parser.add_argument("--target-guidance", type=float, default=None, help="dev only (default 5.5)")
    parser.add_argument("--seed", type=int, default=0, help=f"0 to {SEEDS - 1} (default 0)")
    parser.add_argument("--resize", default=None, choices=RESIZE_POLICIES,
                        help="for a size that is not a multiple of 16: crop (drop the right/bottom remainder) or "
                             "scale (resample to the nearest multiple); default: refuse it")
    parser.add_argument("--max-sequence-length", type=int, default=None,
                        help="T5 tokens per prompt (default: dev 512, schnell 256)")
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
    add_quantize_argument(parser)


def _check(args) -> tuple[int, int]:
    """Everything that can be checked before loading; returns the (height, width) the edit runs at."""
    from fluxjax.commands.generate import check_output_and_model
    from fluxjax.pipeline.conditioning import image_size
    from fluxjax.pipeline.text import check_prompt

    check_prompt("--source-prompt", args.source_prompt)
    check_prompt("--target-prompt", args.target_prompt)
    for name in ("steps", "n_max", "n_avg", "n_min", "max_sequence_length"):
        value, low = getattr(args, name), 0 if name == "n_min" else 1
        if value is not None and value < low:
            raise UsageError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
    # The model's defaults fill in the rest after loading (flowedit.EditSettings.resolve checks again).
    if args.n_max is not None and args.steps is not None and args.n_max > args.steps:
        raise UsageError(f"n_max {args.n_max} is more than the {args.steps} steps of the schedule (n_max <= steps)")
    if args.n_min is not None and args.n_max is not None and args.n_min > args.n_max:
        raise UsageError(f"n_min {args.n_min} is more than n_max {args.n_max} (n_min <= n_max)")
    check_seed("--seed", args.seed)
    for name in ("source_guidance", "target_guidance"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    check_output_and_model(args)
    return image_size(args.image, args.resize, "image")


def check_model(args) -> None:
    """Refuse, before loading, a model FlowEdit cannot run (flowedit.check_variant), read from its
    transformer's config: a Fill or control model has a wider input."""
    from fluxjax.commands.generate import choose_model, model_settings
    from fluxjax.pipeline.conditioning import variant_of
    from fluxjax.sampling.flowedit import check_variant

    model = choose_model(args.model)[0]
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
