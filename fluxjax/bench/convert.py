"""Memory and speed of `fluxjax convert` on a synthetic BFL checkpoint of real-width blocks.

Writes a flux1-style .safetensors file (hidden 3072, 24 heads x 128, FLUX's input widths, bf16)
with as many double/single blocks as asked, converts it with `fluxjax convert` in a child
process and reports the child's peak resident memory (getrusage of that child) against the
checkpoint size and against the target 1 GB + 2 x the largest (stacked) array, and the
throughput. Then restores the Orbax checkpoint and, for comparison, loads the safetensors
file directly, each in its own child process (time and peak RSS). The values are a repeated
random pool: the numbers measured do not depend on them. Files are deleted at the end.

    python -m fluxjax.bench.convert [--double 6] [--single 2] [--quick] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

from fluxjax.bench.common import record

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GB = 1 << 30


def bfl_shapes(double: int, single: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of a FLUX.1-dev-width BFL file with `double`/`single` blocks: key -> shape."""
    from fluxjax.config import FluxConfig
    from fluxjax.loading.flux import bfl_rules
    from fluxjax.loading.table import key_shapes
    from fluxjax.models.flux import Flux, param_shapes

    cfg = FluxConfig.preset("dev").replace(depth=double, depth_single_blocks=single)
    rules = bfl_rules(cfg)
    return key_shapes(rules, param_shapes(Flux(cfg)))


def write_bfl(path: str, shapes: dict[str, tuple[int, ...]]) -> int:
    """Write a bf16 safetensors file of `shapes` one tensor at a time; return its size in bytes."""
    import ml_dtypes

    header, offset = {}, 0
    for key, shape in shapes.items():
        n = int(np.prod(shape)) * 2
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    pool = (np.random.default_rng(0).standard_normal(32 << 20, np.float32) * 0.02).astype(ml_dtypes.bfloat16).view(np.uint8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for i, (key, shape) in enumerate(shapes.items()):
            left = int(np.prod(shape)) * 2
            start = (i * 4096) % (pool.size // 2)
            while left:
                chunk = pool[start : start + min(left, pool.size - start)]
                f.write(chunk.tobytes())
                left -= chunk.size
                start = 0
    return os.path.getsize(path)


def run_child(args: list[str]) -> tuple[float, int, str]:
    """Run `python args` in a child; (wall seconds, that child's peak RSS in bytes, its stdout)."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        child = subprocess.Popen([sys.executable, *args], env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage, not the max over all children
        wall = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if child.returncode:
            raise RuntimeError(f"child {args[:3]} failed ({child.returncode}): {err.read().strip()[-2000:]}")
        return wall, usage.ru_maxrss * 1024, out.read()


LOAD = (
    "import sys, time, jax; from fluxjax.loading.registry import load_transformer; t = time.perf_counter(); "
    "_, p = load_transformer(sys.argv[1], dtype='bfloat16'); jax.block_until_ready(p); "
    "print(time.perf_counter() - t)"
)
BASELINE = "import jax, orbax.checkpoint.experimental.v1, fluxjax.loading.registry, fluxjax.loading.to_orbax; print(0)"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="fluxjax bench convert", description=__doc__.splitlines()[0])
    parser.add_argument("--double", type=int, default=6, help="double-stream blocks (FLUX.1: 19)")
    parser.add_argument("--single", type=int, default=2, help="single-stream blocks (FLUX.1: 38)")
    parser.add_argument("--quick", action="store_true", help="1 double + 1 single block (about 1 GB)")
    parser.add_argument("--dir", default=None, help="where to write the files (default: a temp folder)")
    args = parser.parse_args(argv)
    if args.quick:
        args.double, args.single = 1, 1

    shapes = bfl_shapes(args.double, args.single)
    work = tempfile.mkdtemp(prefix="fluxjax-bench-convert-", dir=args.dir)
    try:
        src, dst = os.path.join(work, "flux1-synthetic.safetensors"), os.path.join(work, "orbax")
        size = write_bfl(src, shapes)
        largest = max(_stacked_bytes(shapes).values())
        _, base_rss, _ = run_child(["-c", BASELINE])
        conv_s, conv_rss, _ = run_child(["-m", "fluxjax.commands.cli", "convert", src, dst, "--dtype", "bfloat16"])
        orbax_s_wall, orbax_rss, orbax_out = run_child(["-c", LOAD, dst])
        st_s_wall, st_rss, st_out = run_child(["-c", LOAD, src])
        lines = [
            f"checkpoint: {size / GB:.2f} GiB bf16 ({args.double} double + {args.single} single blocks of width 3072), "
            f"largest stacked array {largest / GB:.2f} GiB",
            f"python + jax + orbax baseline RSS: {base_rss / GB:.2f} GiB",
            f"convert: {conv_s:.1f} s, {size / conv_s / 2**20:.0f} MB/s, peak RSS {conv_rss / GB:.2f} GiB = "
            f"{conv_rss / size:.2f} x checkpoint; target 1 GiB + 2 x largest = {(GB + 2 * largest) / GB:.2f} GiB "
            f"({'met' if conv_rss <= GB + 2 * largest else 'NOT met'})",
            f"restore Orbax: {float(orbax_out.split()[-1]):.1f} s (process {orbax_s_wall:.1f} s), peak RSS {orbax_rss / GB:.2f} GiB",
            f"load safetensors directly: {float(st_out.split()[-1]):.1f} s (process {st_s_wall:.1f} s), peak RSS {st_rss / GB:.2f} GiB",
        ]
        record("convert peak RSS / checkpoint size", conv_rss / size, unit="x")
        record("convert throughput", size / conv_s / 2**20, unit="MB/s")
        record("restore Orbax (vs load safetensors)", float(orbax_out.split()[-1]), float(st_out.split()[-1]), "s",
               "safetensors direct")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n".join(lines), flush=True)


def _stacked_bytes(shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """bf16 bytes of each Flax leaf: the blocks' tensors of one name summed (nn.scan's stacking)."""
    import re

    out: dict[str, int] = {}
    for key, shape in shapes.items():
        name = re.sub(r"^(double_blocks|single_blocks)\.\d+\.", r"\1.*.", key)
        out[name] = out.get(name, 0) + int(np.prod(shape)) * 2
    return out


if __name__ == "__main__":
    main()
