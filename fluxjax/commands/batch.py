"""`fluxjax batch PROMPTS --out-dir DIR [...]`: every prompt of a file to a PNG, resumable, over hosts.

The file is checked in full before anything is loaded or written. Run the same command on every
host (with jax.distributed set up: see fluxjax.parallel.distributed); each makes its share. Run it again
after a crash or a kill and it makes only what is missing. The format, the split over hosts and
the manifest are described in fluxjax/batch/runner.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax

from fluxjax.pipeline import request
from fluxjax.errors import UsageError
from fluxjax.sampling.sampler import SEEDS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fluxjax.commands.generate import add_memory_arguments

    parser.add_argument("prompts", help="a text file (one prompt a line) or a .jsonl file (one object a line, keys "
                                        "as generate's flags (fluxjax/pipeline/request.py): "
                                        + ", ".join(sorted(request.keys("generate")))
                                        + "; or an edit (image and no prompt): "
                                        + ", ".join(sorted(request.keys("edit"))) + ")")
    parser.add_argument("--out-dir", required=True, help="the folder of the PNGs and the manifests (created if missing)")
    parser.add_argument("--model", default=None,
                        help="a hub-layout folder, an Orbax folder from fluxjax convert, a hub repo id, or 'tiny' "
                             "(default: FLUX.1-schnell from the local hub cache when present, else tiny)")
    parser.add_argument("--sharding", default=None, help="a sharding strategy name or file (default: one device)")
    add_memory_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=1, help="images per compiled batch (default 1)")
    # The request's options as defaults for every line that does not give its own.
    request.add_arguments(parser, "batch", help={
        "seed": f"the k-th prompt (from 0) uses seed + k unless it gives one (seeds 0 to {SEEDS - 1})"})
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))


def run(args) -> int:
    from fluxjax.batch import runner as batch
    from fluxjax.parallel import distributed
    from fluxjax.commands.generate import choose_model
    from fluxjax.pipeline.pipeline import FluxPipeline
    from fluxjax.pipeline.sources import check_source
    from fluxjax.parallel.strategies import Strategy

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    defaults = request.check(request.from_args(args, "batch"), "generate", name=request.flag)
    if args.model is not None:
        check_source(args.model)
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise UsageError(f"--out-dir {args.out_dir}: exists and is not a folder")
    jobs = batch.read_jobs(args.prompts, **defaults)

    host, hosts = distributed.initialize()
    model, notice = choose_model(args.model)
    strategy = Strategy.load(args.sharding) if args.sharding is not None else None
    # Each host makes its own share of the images, so its mesh spans its own devices only.
    devices = jax.local_devices() if strategy is not None else jax.local_devices()[:1]
    _check_sizes(args, model, jobs, strategy, devices)
    if os.path.isdir(args.out_dir):
        done = batch.read_manifests(args.out_dir)
        if any(job.name not in done for job in jobs if job.index % hosts == host):
            batch.check_settings(done, batch.run_settings(args.batch_size, args.dtype, strategy and strategy.name, devices,
                                                            args.quantize))
    if notice is not None and host == 0:
        print(f"fluxjax batch: {notice}", file=sys.stderr)
    start = time.perf_counter()
    pipe = FluxPipeline.from_pretrained(model, dtype=args.dtype, sharding=args.sharding, devices=jax.local_devices(),
                                        quantize=args.quantize, residency=args.residency)
    if args.guidance is not None:
        try:
            pipe.settings(guidance=args.guidance)
        except UsageError as e:
            raise UsageError(f"--guidance: {e}") from None
    if batch.lora_files(jobs):  # live, so that each image runs with its own LoRAs
        pipe.load_lora(batch.lora_files(jobs), fuse=False)
    jobs = batch.resolve(jobs, pipe)
    os.makedirs(args.out_dir, exist_ok=True)
    print(f"fluxjax batch: {len(jobs)} prompts, model {pipe.name} loaded in {time.perf_counter() - start:.1f} s"
          + (f", host {host} of {hosts}" if hosts > 1 else ""), file=sys.stderr, flush=True)
    summary = batch.generate(pipe, jobs, args.out_dir, args.batch_size, host=host, hosts=hosts)
    print(f"fluxjax batch: {summary}", file=sys.stderr, flush=True)
    return 1 if summary.failed else 0


def _check_sizes(args, model: str, jobs, strategy, devices) -> None:
    """Refuse, before loading, any size whose denoising step cannot fit this host's devices
    (fluxjax/plan/limits.py), naming the first line that asks for it."""
    from fluxjax.batch.runner import Job, job_size
    from fluxjax.commands.generate import model_settings
    from fluxjax.pipeline.conditioning import kontext_reference_sizes
    from fluxjax.plan.limits import SizeLimit

    cfg, defaults = model_settings(model)
    seen = set()
    for job in jobs:  # an edit step runs 2 x n_avg rows per image (job.rows)
        size = job_size(job, defaults) if isinstance(job, Job) else (job.height, job.width)
        # Kontext references join every step's sequence (conditioning.kontext_reference_sizes)
        references = tuple(kontext_reference_sizes(getattr(job, "references", ()), f"{job.where}: references"))
        length = getattr(job, "max_sequence_length", None) or defaults.max_sequence_length  # T5 tokens join it too
        if (size, job.rows, references, length) not in seen:
            seen.add((size, job.rows, references, length))
            limit = SizeLimit(cfg, length, args.batch_size * job.rows,
                              args.dtype, strategy, devices)
            limit.check(f"{job.where}: size", *size, references)
