"""`fluxjax train DATA --out DIR [--model SRC] [...]`: rectified-flow fine-tuning of the transformer.

Everything that can be wrong with the data (an empty folder, an image without a caption, an
unreadable image, a side below 16 px) is reported in one line before the model is loaded.
See fluxjax.training.trainer.fit for what DIR receives; `--resume` continues a stopped run exactly.
"""

from __future__ import annotations

import argparse
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", help="a folder of images with captions (name.png + name.txt, or metadata.jsonl)")
    parser.add_argument("--out", required=True, help="the run's folder: checkpoints, loss.csv/png, cache, model/")
    parser.add_argument("--model", default="tiny", help="a hub-layout folder, or 'tiny' (default: tiny, random weights)")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    parser.add_argument("--batch-size", type=int, default=1, help="images per step, all of one aspect bucket (default 1)")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate of AdamW (default 1e-4)")
    parser.add_argument("--warmup", type=int, default=0, help="linear warmup steps before the cosine decay (default 0)")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default 1e-4)")
    parser.add_argument("--clip-norm", type=float, default=1.0, help="global-norm gradient clipping; 0 turns it off (default 1.0)")
    parser.add_argument("--ema", type=float, default=None, help="keep an EMA of the weights with this decay, e.g. 0.999")
    parser.add_argument("--resolution", type=int, default=512, help="side of the buckets' area in pixels (default 512)")
    parser.add_argument("--guidance", type=float, default=1.0, help="guidance input of guidance-distilled models (default 1.0)")
    parser.add_argument("--caption-dropout", type=float, default=0.0, help="probability of training on the empty prompt (default 0)")
    parser.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"),
                        help="stored weights and optimizer state (default float32 master weights)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="compute dtype (default bfloat16)")
    parser.add_argument("--remat", action="store_true", help="recompute block activations in the backward pass (less memory)")
    parser.add_argument("--max-sequence-length", type=int, default=None, help="T5 tokens per caption (default: the model's)")
    parser.add_argument("--sharding", default=None, help="a strategy of fluxjax/configs/sharding or a .toml file (default: one device)")
    parser.add_argument("--seed", type=int, default=0, help="data order, noise and timesteps (default 0)")
    parser.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (default 100)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--lora-rank", type=int, default=None,
                        help="train a LoRA of this rank instead of the weights; writes DIR/lora.safetensors (diffusers layout)")
    parser.add_argument("--lora-alpha", type=float, default=None, help="the LoRA's alpha (default: its rank)")
    parser.add_argument("--lora-targets", default=None,
                        help="comma-separated Linears to adapt, Flax paths such as double_blocks/img_attn/qkv "
                             "(default: attention qkv/proj and MLP of every block)")


def run(args) -> int:
    import math

    from fluxjax.parallel import distributed
    from fluxjax.training.data import scan_folder
    from fluxjax.errors import UsageError
    from fluxjax.sampling.sampler import check_dimension
    from fluxjax.training.trainer import (
        LORA_FILE, MODEL, TrainConfig, check_out_dir, check_processes, fit, locked_on_primary, run_settings,
    )

    for name in ("steps", "batch_size", "save_every", "lora_rank"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("lr", "weight_decay", "clip_norm", "ema", "guidance", "caption_dropout", "lora_alpha"):
        if getattr(args, name) is not None and not math.isfinite(getattr(args, name)):  # argparse's float takes "nan"
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(args, name)}")
    check_dimension("--resolution", args.resolution)
    cfg = TrainConfig(
        learning_rate=args.lr, warmup_steps=args.warmup, total_steps=args.steps, weight_decay=args.weight_decay,
        clip_norm=args.clip_norm or None, ema_decay=args.ema, guidance=args.guidance,
        caption_dropout=args.caption_dropout, param_dtype=args.param_dtype, compute_dtype=args.dtype, remat=args.remat,
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        **({} if args.lora_targets is None else {"lora_targets": tuple(t.strip() for t in args.lora_targets.split(","))}),
    )
    if args.lora_rank is None and (args.lora_alpha is not None or args.lora_targets is not None):
        raise UsageError("--lora-alpha and --lora-targets need --lora-rank")
    examples = scan_folder(args.data)  # before the model: bad data fails in a second, not after loading
    if args.model != "tiny" and not os.path.isdir(args.model):
        raise UsageError(f"--model {args.model}: not a hub-layout folder (or 'tiny')")
    from fluxjax.pipeline.pipeline import FluxPipeline, pipeline_for

    if args.lora_rank is None and args.model != "tiny" and pipeline_for(args.model) is not FluxPipeline:
        raise UsageError(f"--model {args.model}: a FLUX.2 model, of which fluxjax trains LoRAs only for now: "
                         "give --lora-rank")
    settings = run_settings(cfg, args.batch_size, args.seed, args.resolution, args.max_sequence_length)
    # Several processes (fluxjax.parallel.distributed): each joins before any JAX work; process 0 checks and
    # locks --out for all of them, and each raises its refusal.
    distributed.initialize()
    check_processes(args.sharding)
    # before the lock: a refused --out gets no lock file beside it
    distributed.on_primary(check_out_dir, args.out, args.resume, settings)

    with locked_on_primary(args.out):  # before the model loads: a second run on --out is refused at once
        pipe = FluxPipeline.from_pretrained(args.model, dtype=args.dtype, sharding=args.sharding)
        state = fit(pipe, examples, args.out, cfg, batch_size=args.batch_size, seed=args.seed,
                    save_every=args.save_every, resume=args.resume, resolution=args.resolution,
                    max_sequence_length=args.max_sequence_length,
                    source=None if args.model == "tiny" else args.model, progress=True)
    written = LORA_FILE if cfg.lora_rank is not None else MODEL
    if not distributed.is_primary():  # one line per job, not per process
        return 0
    print(f"trained {int(state.step)} steps; {'LoRA' if cfg.lora_rank is not None else 'model'} written to "
          f"{os.path.join(args.out, written)}")
    return 0
