"""`fluxjax convert SRC DST`: safetensors checkpoints to fluxjax Orbax component folders."""

from __future__ import annotations

import argparse
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="a hub folder (model_index.json), one model folder, flux1-*.safetensors (fp8 too), a FLUX .gguf or ae.safetensors")
    parser.add_argument("dst", help="the folder to write; it appears only once complete")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="stored parameter dtype")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing DST that fluxjax convert wrote (swapped in once the new one is complete)")
    parser.add_argument("--quantize", choices=("int8", "fp8"), default=None,
                        help="store the transformer's and T5's Linears weight-only quantized (values + a float32 scale "
                             "per output channel; about half the bf16 bytes to read); load with the same --quantize")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                        help="a LoRA fused into the transformer at strength SCALE (default 1); repeatable")


def run(args) -> int:
    from fluxjax.lora.adapters import parse_lora_arg
    from fluxjax.loading.to_orbax import convert

    before = _identity(args.dst)
    try:
        written = convert(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite,
                          loras=[parse_lora_arg(x) for x in args.lora], quantize=args.quantize)
    except KeyboardInterrupt:
        print(f"fluxjax convert: interrupted; {_outcome(args.dst, before)}", file=sys.stderr)
        return 130
    except FileExistsError:
        raise
    except (ValueError, OSError) as e:
        raise ValueError(f"{e} ({_outcome(args.dst, before)})") from e
    print(f"wrote {args.dst}: " + ", ".join(f"{rel} ({kind})" for rel, kind in written.items()))
    return 0


def _identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of `path` itself (a link is not followed), or None when nothing is there."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):  # NotADirectoryError: a file where a folder of the path should be
        return None
    return st.st_dev, st.st_ino


def _outcome(dst: str, before: tuple[int, int] | None) -> str:
    """What a stopped conversion did to DST, read from the disk rather than assumed: the swap that
    installs a new DST may have happened just before the stop."""
    now = _identity(dst)
    if now == before:
        return f"{dst} left as it was" if before else f"{dst} not created"
    return f"{dst} was replaced by the new conversion" if before else f"{dst} was written"
