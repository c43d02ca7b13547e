"""`fluxjax convert SRC DST`: safetensors checkpoints to fluxjax Orbax component folders."""

from __future__ import annotations

import argparse
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="a hub folder (model_index.json), one model folder, flux1-*.safetensors or ae.safetensors")
    parser.add_argument("dst", help="the folder to write; it appears only once complete")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="stored parameter dtype")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DST (once the new one is complete)")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                        help="a LoRA fused into the transformer at strength SCALE (default 1); repeatable")


def run(args) -> int:
    from fluxjax.lora import parse_lora_arg
    from fluxjax.loading.to_orbax import convert

    existed = os.path.exists(args.dst)
    left = f"{args.dst} left as it was" if existed else f"{args.dst} not created"
    try:
        written = convert(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite,
                          loras=[parse_lora_arg(x) for x in args.lora])
    except KeyboardInterrupt:
        print(f"fluxjax convert: interrupted; {left}", file=sys.stderr)
        return 130
    except FileExistsError:
        raise
    except (ValueError, OSError) as e:
        raise ValueError(f"{e} ({left})") from e
    print(f"wrote {args.dst}: " + ", ".join(f"{rel} ({kind})" for rel, kind in written.items()))
    return 0
