"""`fluxjax bench quantization`: the error of int8 and fp8 weights (fluxjax/models/quantize.py) beside the
error bf16 itself makes, on a random transformer (docs/quantization.md has the figures).

The yardstick is float32: for each quantized Linear, and for the whole transformer, the relative
error of bf16 against float32 next to that of int8 and fp8 (each computing in bf16) against float32;
and the time and memory of one step with each, against bf16 in the same run.
`--pipeline`: the pixels of a pipeline whose transformer has FLUX.1's widths (hidden 3072, 24
heads, few blocks) and the tiny T5, CLIP and VAE, against the float32 pipeline (max error, PSNR).
Random weights are Gaussian: real checkpoints have outlier channels that a per-channel scale
absorbs only in part, so these are the floor of the error on a real model, not its value.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from fluxjax.loading.checkpoint import flat
from fluxjax.config import FluxConfig
from fluxjax.models.quantize import MODES, dequantize, quantize_kernel, quantized_kernels

PRECISIONS = ("bfloat16",) + tuple(MODES)  # what each error is measured for, against float32


def relative_error(got, want) -> float:
    """||got - want|| / ||want|| in float64 (Frobenius norms over every element)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def layer_errors(params_f32: dict, kernels, tokens: int = 256, seed: int = 0) -> dict[str, dict[str, float]]:
    """{kernel path: {precision: relative error of x @ W}} for each stacked kernel path of `kernels`
    (its block 0), x Gaussian (tokens, in): W rounded to bf16, or quantized (int8, fp8), against
    float32 W, the product in float64."""
    rng = np.random.default_rng(seed)
    leaves = flat(params_f32)
    out = {}
    for path in sorted(kernels):
        w = np.asarray(leaves[path], np.float32)
        w = w[0] if w.ndim == 3 else w  # block 0 of a stack
        x = rng.standard_normal((tokens, w.shape[0]))
        want = x @ w.astype(np.float64)
        row = {"bfloat16": relative_error(x @ np.asarray(jnp.asarray(w, jnp.bfloat16), np.float64), want)}
        for mode in MODES:
            row[mode] = relative_error(x @ dequantize(*quantize_kernel(w, mode), np.float64), want)
        out[path] = row
    return out


def model_errors(cfg: FluxConfig, seed: int = 0, grid: tuple[int, int] = (8, 8), txt_len: int = 16
                 ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """(whole, layers): the transformer's output on Gaussian inputs with random weights (seed), as
    {precision: {relative, max_abs, relative_to_bf16}}: against the float32 model (max_abs over the
    output, whose scale is about 1) and, relative_to_bf16, against the bf16 model (what quantizing
    changes); and `layer_errors` of its quantized Linears."""
    from fluxjax.loading.registry import abstract_params, build, random_component

    args = transformer_inputs(cfg, np.random.default_rng(seed + 1), grid, txt_len)

    def run(dtype, quantize=None):
        model, params = random_component("transformer", cfg, dtype, seed=seed, attention_impl="xla",
                                         quantize=quantize)
        return model, params, np.asarray(jax.jit(model.apply)({"params": params}, *args), np.float64)

    model, params_f32, want = run("float32")
    whole, bf16 = {}, None
    for p in PRECISIONS:  # bfloat16 first
        got = run("bfloat16", None if p == "bfloat16" else p)[2]
        bf16 = got if bf16 is None else bf16
        whole[p] = dict(relative=relative_error(got, want), max_abs=float(np.abs(got - want).max()),
                        relative_to_bf16=relative_error(got, bf16))
    shapes = abstract_params("transformer", build("transformer", cfg, "bfloat16", quantize="int8"))
    return whole, layer_errors(params_f32, quantized_kernels(flat(shapes)))


def bf16_kernel_copies(hlo: str, leaves: dict) -> dict[str, int]:
    """{kernel shape: count} of the bf16 arrays that a compiled program (its HLO text) makes
    outside fusions with the per-layer shape of a quantized kernel among `leaves` (the flat
    abstract parameters, stacked layout): converted copies of the weights that the matmul did not
    fuse. Shapes that an unquantized parameter also has (its bf16 weight is itself such an array)
    are left out."""
    import re

    kernels = quantized_kernels(leaves)
    quantized = {tuple(leaves[k].shape[-2:]) for k in kernels}
    plain = {tuple(v.shape[-2:]) for k, v in leaves.items() if k not in kernels and len(v.shape) >= 2}
    found = {}
    # computations are separated by blank lines; a fused one is named %fused... or ...fusion...
    for comp in hlo.split("\n\n"):
        head = comp.lstrip().split(" ", 2)
        name = head[1] if head[0] == "ENTRY" else head[0]
        if "fused" in name or "fusion" in name:
            continue
        for shape in quantized - plain:
            count = len(re.findall(r"= bf16\[%s\]" % ",".join(map(str, shape)), comp))
            if count:
                key = "x".join(map(str, shape))
                found[key] = found.get(key, 0) + count
    return found


def step_memory(cfg: FluxConfig, tokens: int = 1024, txt_len: int = 64) -> dict[str, dict]:
    """One forward step of `cfg` (batch 1) compiled for this process's first device, bf16 and with
    int8 / fp8 weights: {precision: {argument_bytes, temp_bytes, bf16_kernel_copies}}."""
    import flax.linen as nn

    from fluxjax.loading.registry import abstract_params, build

    out = {}
    for p in PRECISIONS:
        flux = build("transformer", cfg, "bfloat16", attention_impl="xla",
                     quantize=None if p == "bfloat16" else p)
        params = jax.tree.map(lambda b: jax.ShapeDtypeStruct(b.value.shape, b.value.dtype),
                              abstract_params("transformer", flux), is_leaf=lambda x: isinstance(x, nn.Partitioned))
        arg = lambda *shape: jax.ShapeDtypeStruct((1, *shape), jnp.float32)  # noqa: E731
        args = (arg(tokens, cfg.in_channels), arg(tokens, 3), arg(txt_len, cfg.context_in_dim), arg(txt_len, 3), arg(),
                arg(cfg.vec_in_dim), arg() if cfg.guidance_embed else None)
        compiled = jax.jit(flux.apply).lower({"params": params}, *args).compile()
        stats = compiled.memory_analysis()
        out[p] = dict(argument_bytes=int(stats.argument_size_in_bytes), temp_bytes=int(stats.temp_size_in_bytes),
                      bf16_kernel_copies=bf16_kernel_copies(compiled.as_text(), flat(params)))
    return out


def step_costs(cfg: FluxConfig, tokens: int = 256, txt_len: int = 64, repeat: int = 5, seed: int = 0) -> dict[str, dict]:
    """One forward step of `cfg` (batch 1, random weights) on this process's first device, bf16
    and with int8 / fp8 weights: {precision: {seconds (median of `repeat`, the precisions taking
    turns), argument_bytes, temp_bytes (the compiled program's)}}."""
    from fluxjax.bench.common import median_times
    from fluxjax.loading.registry import random_component

    rng = np.random.default_rng(seed + 1)
    inputs = transformer_inputs(cfg, rng, (tokens // 16, 16), txt_len)
    compiled, out = {}, {}
    for p in PRECISIONS:
        model, params = random_component("transformer", cfg, "bfloat16", seed=seed, attention_impl="xla",
                                         quantize=None if p == "bfloat16" else p)
        fn = jax.jit(model.apply).lower({"params": params}, *inputs).compile()
        stats = fn.memory_analysis()
        compiled[p] = (fn, params)
        out[p] = dict(argument_bytes=int(stats.argument_size_in_bytes), temp_bytes=int(stats.temp_size_in_bytes))
    runs = [lambda fn=fn, params=params: fn({"params": params}, *inputs).block_until_ready()
            for fn, params in compiled.values()]
    for p, seconds in zip(compiled, median_times(runs, repeat)):
        out[p]["seconds"] = seconds
    return out


def transformer_inputs(cfg: FluxConfig, rng, grid: tuple[int, int], txt_len: int) -> tuple:
    """Gaussian (img, img_ids, txt, txt_ids, timesteps, y, guidance) of batch 1 for `cfg`, a
    (rows, cols) grid of image tokens and `txt_len` text tokens."""
    from fluxjax.sampling import sampler as sampling

    rows, cols = grid
    guidance = np.full(1, 3.5, np.float32) if cfg.guidance_embed else None
    return (rng.standard_normal((1, rows * cols, cfg.in_channels)).astype(np.float32),
            np.array(sampling.image_ids(1, rows * sampling.PIXELS_PER_TOKEN, cols * sampling.PIXELS_PER_TOKEN)),
            rng.standard_normal((1, txt_len, cfg.context_in_dim)).astype(np.float32), sampling.text_ids(1, txt_len),
            np.array([0.7], np.float32), rng.standard_normal((1, cfg.vec_in_dim)).astype(np.float32), guidance)


# (compute dtype, weights) of each pipeline `pipeline_errors` runs; the first is the yardstick.
PIPELINES = (("float32", None), ("bfloat16", None), ("bfloat16", "int8"), ("bfloat16", "fp8"),
             ("float32", "int8"), ("float32", "fp8"))


def psnr(got: np.ndarray, want: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1]."""
    mse = float(np.mean((np.asarray(got, np.float64) - np.asarray(want, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * float(np.log10(1.0 / mse))


def pipeline_errors(hidden: int = 3072, heads: int = 24, depth: int = 1, single: int = 2, size: int = 128,
                    steps: int = 4, prompts: tuple[str, ...] = ("a red square", "a blue circle"), seed: int = 0
                    ) -> dict[tuple[str, str | None], dict[str, float]]:
    """Pixels of FluxPipeline with a random transformer of FLUX.1's widths (`hidden`, `heads`:
    3072 and 24; `depth` + `single` blocks; weights at the model's init scale, N(0, 1/fan_in),
    norms 1, biases 0) and the tiny preset's T5, CLIP and VAE, `size` x `size` pixels, `steps`
    steps, guidance 3.5, for each of PIPELINES: {(dtype, quantize): {max_abs, psnr} against the
    float32 pipeline, and max_abs_to_bf16, psnr_to_bf16 against the bf16 one}."""
    import dataclasses

    from fluxjax.loading.registry import random_component
    from fluxjax.pipeline.components import Component, tiny_components
    from fluxjax.pipeline.pipeline import FluxPipeline
    from fluxjax.sampling.sampler import Schedule
    from fluxjax.bench.common import rope_axes

    cfg = dataclasses.replace(FluxConfig.preset("tiny"), hidden_size=hidden, num_heads=heads, depth=depth,
                              depth_single_blocks=single, axes_dim=rope_axes(hidden // heads))
    images = {}
    for dtype, mode in PIPELINES:
        parts, tokenizer = tiny_components(dtype, "xla", dict.fromkeys(("transformer", "t5", "clip", "vae")), mode)
        parts["transformer"] = Component(*random_component("transformer", cfg, dtype, seed=seed, attention_impl="xla",
                                                           quantize=mode))
        pipe = FluxPipeline(**parts, tokenizer=tokenizer, schedule=Schedule.dev(), kind="tiny", name="full-width")
        images[dtype, mode] = pipe(list(prompts), height=size, width=size, num_steps=steps, guidance=3.5, seed=seed,
                                   max_sequence_length=16, output="np")
        del pipe, parts  # one full-width transformer in memory at a time
    want, bf16 = images[PIPELINES[0]], images["bfloat16", None]
    return {key: dict(max_abs=float(np.abs(got - want).max()), psnr=psnr(got, want),
                      max_abs_to_bf16=float(np.abs(got - bf16).max()), psnr_to_bf16=psnr(got, bf16))
            for key, got in images.items() if key != PIPELINES[0]}


def topology_copies(topology: str, mode: str) -> dict:
    """dev's denoising loop (1024x1024, batch 1) with `mode` weights compiled for TPU `topology`
    (fluxjax/plan/tpu.py): {argument_bytes, temp_bytes, bf16_kernel_copies}."""
    from fluxjax.plan import tpu as plan_tpu
    from fluxjax.plan.planner import T5_LENGTHS
    from fluxjax.parallel.strategies import Strategy

    devices = plan_tpu.topology_devices(topology)
    strategy = Strategy.load("fsdp")
    mesh = strategy.make_mesh(devices)
    fn, args, kwargs = plan_tpu.program_inputs("dev", strategy, mesh, 1, 1024, 1024, T5_LENGTHS["dev"],
                                               quantize=mode)["denoise"]
    with strategy.activate(mesh):
        compiled = fn.lower(*args, **kwargs).compile()
    stats = compiled.memory_analysis()
    return dict(argument_bytes=int(stats.argument_size_in_bytes), temp_bytes=int(stats.temp_size_in_bytes),
                bf16_kernel_copies=bf16_kernel_copies(compiled.as_text(), flat(args[1])))


def main(argv=None) -> None:
    from fluxjax.bench.common import record, rope_axes

    parser = argparse.ArgumentParser(prog="fluxjax bench quantization", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=None,
                        help="hidden size (default 512; with --pipeline 3072, dev's)")
    parser.add_argument("--heads", type=int, default=None,
                        help="attention heads (default 4: head dim 128 as dev's; with --pipeline 24, dev's)")
    parser.add_argument("--depth", type=int, default=4, help="double blocks (default 4)")
    parser.add_argument("--single", type=int, default=8, help="single blocks (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory", action="store_true",
                        help="instead: compile one step (1024 image tokens) on this device, bf16 vs int8 vs fp8, and "
                             "report its memory and the bf16 copies of quantized weights it makes")
    parser.add_argument("--pipeline", action="store_true",
                        help="instead: pixels (max error, PSNR) of a pipeline with a full-width transformer (hidden "
                             "3072, 24 heads; --depth 1 --single 2 are its blocks here) and the tiny T5, CLIP and VAE, "
                             "bf16 / int8 / fp8 against float32")
    parser.add_argument("--size", type=int, default=128, help="with --pipeline: image side in pixels (default 128)")
    parser.add_argument("--steps", type=int, default=4, help="with --pipeline: denoising steps (default 4)")
    parser.add_argument("--tokens", type=int, default=256,
                        help="image tokens of the timed step (default 256; 64 text tokens beside them)")
    parser.add_argument("--topology", help="instead: the same for dev's denoising loop with int8 weights compiled "
                                           "for this TPU topology (e.g. v5e:1x1; needs libtpu)")
    args = parser.parse_args(argv)
    full = (3072, 24) if args.pipeline else (512, 4)  # FLUX.1's widths for the pixels; mid-size for the rest
    args.hidden, args.heads = args.hidden or full[0], args.heads or full[1]
    if args.topology:
        print(topology_copies(args.topology, "int8"))
        return
    if args.pipeline:
        rows = pipeline_errors(args.hidden, args.heads, args.depth, args.single, args.size, args.steps, seed=args.seed)
        print(f"pipeline: transformer hidden {args.hidden}, {args.heads} heads, {args.depth}+{args.single} blocks "
              f"(random, init scale), tiny T5/CLIP/VAE, {args.size}x{args.size}, {args.steps} steps, 2 prompts; "
              "pixels in [0, 1]:")
        print(f"  {'compute':<9} {'weights':<8} {'max abs vs f32':>15} {'PSNR vs f32':>12} {'max abs vs bf16':>16} "
              f"{'PSNR vs bf16':>13}")
        for (dtype, mode), e in rows.items():
            print(f"  {dtype:<9} {mode or dtype:<8} {e['max_abs']:15.4f} {e['psnr']:10.1f} dB {e['max_abs_to_bf16']:16.4f} "
                  f"{e['psnr_to_bf16']:11.1f} dB")
            record(f"pipeline {dtype} {mode or ''} PSNR vs float32", e["psnr"], unit="dB")
        return
    axes = rope_axes(args.hidden // args.heads)
    cfg = FluxConfig(vec_in_dim=64, context_in_dim=128, hidden_size=args.hidden, num_heads=args.heads,
                     depth=args.depth, depth_single_blocks=args.single, axes_dim=axes, guidance_embed=True)
    if args.memory:
        for p, m in step_memory(cfg).items():
            print(f"  {p:<9} arguments {m['argument_bytes'] / 1e6:.1f} MB, temporaries {m['temp_bytes'] / 1e6:.1f} MB, "
                  f"bf16 copies of quantized weights outside fusions {m['bf16_kernel_copies'] or 'none'}")
        return
    whole, layers = model_errors(cfg, args.seed)
    print(f"transformer hidden {args.hidden}, {args.depth}+{args.single} blocks, random weights (seed {args.seed}); "
          "relative error against float32 (max abs in brackets):")
    for p, e in whole.items():
        print(f"  whole model  {p:<9} {e['relative']:.2e}  ({e['max_abs']:.2e}); against bf16 {e['relative_to_bf16']:.2e}")
        record(f"whole model {p} vs float32", e["relative"], unit="relative")
    print("  per Linear (block 0, x @ W on Gaussian x):  " + "  ".join(f"{p:>9}" for p in PRECISIONS))
    for path, row in layers.items():
        print(f"  {path:<42} " + "  ".join(f"{row[p]:.2e}" for p in PRECISIONS))
    costs = step_costs(cfg, args.tokens)
    base = costs["bfloat16"]
    print(f"one step on {jax.devices()[0].device_kind} ({args.tokens} image + 64 text tokens, bf16 compute), "
          "against bf16 in this run:")
    for p, c in costs.items():
        memory = c["argument_bytes"] + c["temp_bytes"]
        print(f"  {p:<9} {c['seconds'] * 1e3:9.1f} ms ({base['seconds'] / c['seconds']:.2f}x bf16's speed)   "
              f"arguments {c['argument_bytes'] / 1e6:7.1f} MB + temporaries {c['temp_bytes'] / 1e6:7.1f} MB "
              f"({memory / (base['argument_bytes'] + base['temp_bytes']):.2f}x bf16's)")
        record(f"step {p}", c["seconds"] * 1e3, base["seconds"] * 1e3, "ms", "bf16 weights, same run")
        record(f"step memory {p}", memory / 1e6, (base["argument_bytes"] + base["temp_bytes"]) / 1e6, "MB",
               "bf16 weights, same run")


if __name__ == "__main__":
    main()
