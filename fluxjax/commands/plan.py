"""`fluxjax plan`: per-device memory of a sharding strategy, before a pod is booked.

`fluxjax plan --train` tabulates a training step instead (full fine-tuning and LoRA, with and
without remat) for each strategy of --sharding (a comma-separated list; default dp,fsdp,tp,fsdp_tp).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="dev", help="dev, schnell or tiny (default dev)")
    parser.add_argument("--sharding", default=None,
                        help="strategy name from fluxjax/configs/sharding or a .toml path (default fsdp; "
                             "with --train a comma-separated list, default dp,fsdp,tp,fsdp_tp)")
    parser.add_argument("--devices", type=int, required=True, help="number of devices (accelerators) in the mesh")
    parser.add_argument("--hbm", help="memory per device, e.g. 16GiB: say whether the plan fits "
                                      "(with --train a comma-separated list, default 16GiB,80GiB)")
    parser.add_argument("--train", action="store_true", help="plan a training step (full and LoRA) instead of sampling")
    parser.add_argument("--lora-rank", type=int, default=16, help="with --train: the LoRA's rank (default 16)")
    parser.add_argument("--size", default="1024x1024", help="WIDTHxHEIGHT in pixels (default 1024x1024)")
    parser.add_argument("--batch", type=int, help="images per step (default: one per data shard)")
    parser.add_argument("--dtype", default="bfloat16", help="parameters and activations (default bfloat16)")
    parser.add_argument("--no-xla", dest="xla", action="store_false",
                        help="skip the AOT compile on simulated CPU devices (analytic activations only)")


def run(args) -> int:
    from fluxjax.errors import UsageError
    from fluxjax.plan import format_plan, make_plan, parse_bytes, parse_size
    from fluxjax.sharding import Strategy

    if args.devices < 1:
        raise UsageError(f"--devices {args.devices}: must be at least 1")
    height, width = parse_size(args.size)
    if args.train:
        return _train(args, height, width)
    args.sharding = args.sharding or "fsdp"
    hbm = parse_bytes(args.hbm) if args.hbm else None
    plan = make_plan(args.model, Strategy.load(args.sharding), args.devices, height, width, args.batch, args.dtype, hbm, args.xla)
    print(format_plan(plan))
    return 0


def _train(args, height: int, width: int) -> int:
    from fluxjax.errors import UsageError
    from fluxjax.plan import T5_LENGTHS, format_train_plans, parse_bytes, train_plan
    from fluxjax.sharding import Strategy

    if args.model not in T5_LENGTHS:
        raise UsageError(f"--model {args.model!r}: choose from {', '.join(T5_LENGTHS)}")
    if args.lora_rank < 1:
        raise UsageError(f"--lora-rank {args.lora_rank}: must be at least 1")
    hbms = [parse_bytes(h) for h in (args.hbm or "16GiB,80GiB").split(",")]
    strategies = [Strategy.load(name.strip()) for name in (args.sharding or "dp,fsdp,tp,fsdp_tp").split(",")]
    dtype = "float32" if args.dtype == "float32" else "bfloat16"
    plans = [train_plan(args.model, s, args.devices, height, width, args.batch, rank, dtype)
             for s in strategies for rank in (None, args.lora_rank)]
    print(format_train_plans(plans, args.model, height, width, hbms))
    return 0
