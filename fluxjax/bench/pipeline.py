"""`fluxjax bench pipeline`: a denoising step of fluxjax's FluxPipeline against diffusers'
FluxPipeline on the same small random hub folder, size and noise, in the same run; and the
end-to-end time of one tiny-model image from a fresh process, compilation included.

A step's time is the difference between runs of two step counts, divided by the difference,
so text encoding and decoding cancel out. Needs the test extra (torch, diffusers).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from functools import partial

import numpy as np

from fluxjax.bench.common import add_model_size_arguments, median_times, record, report, rope_axes

FEW, MANY = 2, 6  # step counts whose difference gives the time of a step


def _per_step(runs, repeat: int) -> list[float]:
    """Seconds per denoising step of each `run(num_steps)` in `runs` (each must block until done).

    All runs and step counts take turns within every repetition (see median_times); each step
    count is its own compiled loop, warmed up first.
    """
    timed = [partial(run, steps) for run in runs for steps in (FEW, MANY)]
    medians = median_times(timed, repeat)
    return [(many - few) / (MANY - FEW) for few, many in zip(medians[::2], medians[1::2])]


def _steps(args) -> None:
    import torch
    from diffusers import FluxPipeline as DiffusersFluxPipeline

    from fluxjax.pipeline.pipeline import FluxPipeline
    from fluxjax.testing.reference import make_hub_pipeline

    torch.set_num_threads(args.threads)
    head_dim = args.hidden // args.heads
    h = w = args.size
    prompts = ["a photo of a cat sitting on a red sofa"] * args.batch
    with tempfile.TemporaryDirectory() as root:
        reference = make_hub_pipeline(root, "dev", num_layers=args.double, num_single_layers=args.single,
                                      attention_head_dim=head_dim, num_attention_heads=args.heads, axes_dims_rope=rope_axes(head_dim))
        ours = FluxPipeline.from_pretrained(root, dtype="float32")
    noise = torch.randn(args.batch, 16, h // 8, w // 8, generator=torch.Generator().manual_seed(0))
    packed = DiffusersFluxPipeline._pack_latents(noise, args.batch, 16, h // 8, w // 8)
    common = dict(max_sequence_length=args.t5_length)

    def run_reference(steps):
        with torch.no_grad():
            return reference(prompt=prompts, height=h, width=w, num_inference_steps=steps, latents=packed,
                             guidance_scale=3.5, output_type="np", **common).images

    def run_fluxjax(steps):
        return ours(prompts, num_steps=steps, guidance=3.5, latents=noise.numpy(), output="np", **common)

    reference.set_progress_bar_config(disable=True)
    error = float(np.abs(run_fluxjax(MANY) - run_reference(MANY)).max())
    tokens = (h // 16) * (w // 16)
    print(f"pipeline step: hidden {args.hidden} ({args.heads} heads), {args.double}+{args.single} blocks, "
          f"{h}x{w} ({tokens} image + {args.t5_length} text tokens), batch {args.batch}, float32, "
          f"{args.threads} threads; max pixel difference {error:.1e}", flush=True)
    theirs_s, ours_s = _per_step([run_reference, run_fluxjax], args.repeat)
    report("  per denoising step (target >= 1.3x)", ours_s, theirs_s, "diffusers FluxPipeline (eager)")


def _end_to_end(args) -> None:
    """One tiny image from a fresh process, compile included (persistent cache off)."""
    env = {**os.environ, "FLUXJAX_COMPILATION_CACHE": "off", "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "fluxjax.commands.cli", "generate", "a photo of a cat", "--model", "tiny",
                              "--out", os.path.join(folder, "tiny.png")], capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
    if run.returncode:
        raise RuntimeError(f"fluxjax generate failed:\n{run.stderr}")
    stages = run.stderr.strip().splitlines()[-1]
    print(f"tiny image end to end (fresh process, compile included, 256x256, 4 steps): {wall:.1f} s\n  {stages}", flush=True)
    record("tiny image end to end, compile included", wall, unit="s")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="fluxjax bench pipeline", description=__doc__.split("\n\n")[0])
    add_model_size_arguments(parser, hidden=256, heads=4)
    parser.add_argument("--size", type=int, default=256, help="image height and width in pixels")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--t5-length", type=int, default=128)
    # 15: with 5, the ratio of one run ranged over 1.17-1.54x on this shared 2-core machine;
    # with 15 three runs gave 1.25-1.28x.
    parser.add_argument("--repeat", type=int, default=15, help="timed repetitions of each step count")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="PyTorch threads")
    args = parser.parse_args(argv)
    _steps(args)
    _end_to_end(args)
