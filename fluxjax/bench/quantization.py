"""`fluxjax bench quantization`: the error of int8 and fp8 weights (fluxjax/models/quantize.py) beside the
error bf16 itself makes, on a random transformer (docs/quantization.md has the figures).

The yardstick is float32: for each quantized Linear, and for the whole transformer, the relative
error of bf16 against float32 next to that of int8 and fp8 (each computing in bf16) against float32.
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
    from fluxjax.sampling import sampler as sampling
    from fluxjax.loading.registry import abstract_params, build, random_component

    rng = np.random.default_rng(seed + 1)
    rows, cols = grid
    guidance = np.full(1, 3.5, np.float32) if cfg.guidance_embed else None
    args = (rng.standard_normal((1, rows * cols, cfg.in_channels)).astype(np.float32),
            np.array(sampling.image_ids(1, rows * sampling.PIXELS_PER_TOKEN, cols * sampling.PIXELS_PER_TOKEN)),
            rng.standard_normal((1, txt_len, cfg.context_in_dim)).astype(np.float32), sampling.text_ids(1, txt_len),
            np.array([0.7], np.float32), rng.standard_normal((1, cfg.vec_in_dim)).astype(np.float32), guidance)

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
    parser.add_argument("--hidden", type=int, default=512, help="hidden size (default 512; dev: 3072)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default 4: head dim 128 as dev's)")
    parser.add_argument("--depth", type=int, default=4, help="double blocks (default 4)")
    parser.add_argument("--single", type=int, default=8, help="single blocks (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory", action="store_true",
                        help="instead: compile one step (1024 image tokens) on this device, bf16 vs int8 vs fp8, and "
                             "report its memory and the bf16 copies of quantized weights it makes")
    parser.add_argument("--topology", help="instead: the same for dev's denoising loop with int8 weights compiled "
                                           "for this TPU topology (e.g. v5e:1x1; needs libtpu)")
    args = parser.parse_args(argv)
    if args.topology:
        print(topology_copies(args.topology, "int8"))
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


if __name__ == "__main__":
    main()
