"""`fluxjax bench lora`: the cost per denoising step of LoRAs run live in the loop, against the
same LoRA fused into the weights (and the model without LoRA), on one small random hub folder.

A step's time is the difference between runs of two step counts (see bench/pipeline.py). Live
adds two thin matmuls (rank r) beside every adapted Linear; fused costs nothing per step but
fixes the strengths and needs a new copy of the weights per LoRA set. Needs the test extra.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import jax
import numpy as np

from fluxjax.bench.common import add_model_size_arguments, record, report, rope_axes
from fluxjax.config import FluxConfig


def write_random_lora(path: str, cfg: FluxConfig, rank: int, seed: int = 0) -> None:
    """A kohya-layout LoRA of `rank` on every Linear of a transformer of `cfg` (random, alpha 2),
    sized so that it visibly changes the output."""
    from safetensors.numpy import save_file

    from fluxjax.lora.formats import STACKS
    from fluxjax.models.flux import param_shapes
    from fluxjax.models.flux import Flux

    rng = np.random.default_rng(seed)
    tensors = {}
    for p, x in jax.tree_util.tree_flatten_with_path(param_shapes(Flux(cfg)))[0]:
        names = [k.key for k in p if isinstance(k, jax.tree_util.DictKey)]
        if names[-1] != "kernel":
            continue
        stacked = names[0] in STACKS
        for i in range(x.shape[0] if stacked else 1):
            key = "lora_unet_" + "_".join(names[:1] + [str(i)] + names[1:-1] if stacked else names[:-1])
            in_dim, out_dim = x.shape[-2:]
            tensors[f"{key}.lora_down.weight"] = (rng.standard_normal((rank, in_dim)) / in_dim**0.5).astype(np.float32)
            tensors[f"{key}.lora_up.weight"] = (0.5 * rng.standard_normal((out_dim, rank)) / rank**0.5).astype(np.float32)
            tensors[f"{key}.alpha"] = np.array(2.0, np.float32)
    save_file(tensors, path)


def main(argv=None) -> None:
    from fluxjax.bench.pipeline import _per_step
    from fluxjax.pipeline.pipeline import FluxPipeline
    from fluxjax.testing.reference import make_hub_pipeline

    parser = argparse.ArgumentParser(prog="fluxjax bench lora", description=__doc__.split("\n\n")[0])
    add_model_size_arguments(parser, hidden=256, heads=4)
    parser.add_argument("--size", type=int, default=256, help="image height and width in pixels")
    parser.add_argument("--rank", type=int, default=16, help="rank of each LoRA")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--t5-length", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=9, help="timed repetitions of each step count")
    args = parser.parse_args(argv)

    head_dim = args.hidden // args.heads
    with tempfile.TemporaryDirectory() as root:
        make_hub_pipeline(root, "dev", num_layers=args.double, num_single_layers=args.single,
                          attention_head_dim=head_dim, num_attention_heads=args.heads, axes_dims_rope=rope_axes(head_dim))
        plain = FluxPipeline.from_pretrained(root, dtype="float32")
        files = [os.path.join(root, f"lora{k}.safetensors") for k in range(2)]
        for k, f in enumerate(files):
            write_random_lora(f, plain.transformer.model.config, args.rank, seed=k)
        fused = FluxPipeline.from_pretrained(root, dtype="float32", loras=[(files[0], 0.8)])
        live = FluxPipeline.from_pretrained(root, dtype="float32")
        live.load_lora([(files[0], 0.8)])
        live2 = FluxPipeline.from_pretrained(root, dtype="float32")
        live2.load_lora([(files[0], 0.8), (files[1], 0.5)])

    prompts = ["a photo of a cat sitting on a red sofa"] * args.batch
    common = dict(height=args.size, width=args.size, guidance=3.5, max_sequence_length=args.t5_length, seed=0, output="np")
    runs = [lambda steps, p=p: p(prompts, num_steps=steps, **common) for p in (plain, fused, live, live2)]
    error = float(np.abs(runs[2](6) - runs[1](6)).max())
    tokens = (args.size // 16) ** 2
    print(f"lora step: hidden {args.hidden} ({args.heads} heads), {args.double}+{args.single} blocks, "
          f"{args.size}x{args.size} ({tokens} image + {args.t5_length} text tokens), batch {args.batch}, float32, "
          f"rank {args.rank} on every Linear, {jax.devices()[0].platform}; live vs fused max pixel difference {error:.1e}",
          flush=True)
    plain_s, fused_s, live_s, live2_s = _per_step(runs, args.repeat)
    record("per step, no LoRA", plain_s * 1e3)
    report("  per step, 1 LoRA live vs fused", live_s, fused_s, "fused")
    report("  per step, 2 LoRAs live vs fused", live2_s, fused_s, "fused")
