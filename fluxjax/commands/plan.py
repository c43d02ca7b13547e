"""`fluxjax plan`: per-device memory of a sharding strategy, before a pod is booked."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="dev", help="dev, schnell or tiny (default dev)")
    parser.add_argument("--sharding", default="fsdp", help="strategy name from fluxjax/configs/sharding or a .toml path (default fsdp)")
    parser.add_argument("--devices", type=int, required=True, help="number of devices (accelerators) in the mesh")
    parser.add_argument("--hbm", help="memory per device, e.g. 16GiB: say whether the plan fits")
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
    hbm = parse_bytes(args.hbm) if args.hbm else None
    plan = make_plan(args.model, Strategy.load(args.sharding), args.devices, height, width, args.batch, args.dtype, hbm, args.xla)
    print(format_plan(plan))
    return 0
