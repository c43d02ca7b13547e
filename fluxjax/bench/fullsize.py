"""`fluxjax bench fullsize`: the full-size denoising step on an accelerator, random bf16 weights.

For each size and batch: compile time, seconds per step (the jitted Euler loop over a few steps),
images per second of denoising at the model's step count, model FLOPs utilisation against the
chip's bf16 peak (FLOPs counted from the shapes of docs/model-reference.md: 74.4 TFLOP per dev step at
1024x1024), and peak device memory; each attention implementation asked for ("auto" printed with
what it resolves to here); with `--compare-diffusers`, diffusers' bf16 transformer on the same GPU
in the same run, eager and under torch.compile (its compile time reported). The XLA_FLAGS in force
are printed, and whether fluxjax set them (fluxjax/runtime.py).

On a CPU the full model does not fit: the section then runs the `tiny` preset, which exercises
every line of the harness (MFU is not given: a CPU has no bf16 peak in the table).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from fluxjax.bench.common import median_time, record
from fluxjax.config import FluxConfig

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets.
BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "TPU v4": 275e12,
             "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12}
# JAX's device_kind of a v5p chip is plain "TPU v5" (a v5e is "TPU v5 lite").
DEVICE_KINDS = {"TPU v5": "TPU v5p"}
STEPS = {"dev": 28, "schnell": 4, "tiny": 4}
T5_LENGTH = {"dev": 512, "schnell": 256, "tiny": 64}


def step_flops(cfg: FluxConfig, batch: int, l_img: int, l_txt: int) -> float:
    """FLOPs of one transformer forward (2 per multiply-add), from the shapes of
    docs/model-reference.md, "The transformer".

    Linear layers: 2 * tokens * in * out; attention: 4 * L^2 * hidden (QK^T and PV) per block.
    The MLP's first Linear has cfg.mlp_up_dim outputs (FLUX.2's SwiGLU: gate and value).
    Embedders and the modulation (one token per image; FLUX.2's once per block kind) are
    included; norms and RoPE are not.
    """
    h, mlp, up, l = cfg.hidden_size, cfg.mlp_hidden_dim, cfg.mlp_up_dim, l_img + l_txt
    per_stream = 3 * h * h + h * h + h * up + mlp * h  # qkv, proj, mlp in and out
    double_mod, single_mod = 2 * 2 * h * 6 * h, 2 * h * 3 * h
    double = 2 * (l_img + l_txt) * per_stream + 4 * l * l * h
    single = 2 * l * (h * (3 * h + up) + (h + mlp) * h) + 4 * l * l * h
    modulation = (double_mod + single_mod) if cfg.shared_modulation else (cfg.depth * double_mod
                                                                          + cfg.depth_single_blocks * single_mod)
    embed = 2 * (l_img * cfg.in_channels * h + l_txt * cfg.context_in_dim * h) + 2 * l_img * h * cfg.out_channels
    embedders = (1 + cfg.guidance_embed + bool(cfg.vec_in_dim))
    vectors = 2 * (256 * h + h * h) * embedders + 2 * h * 2 * h
    return float(batch * (cfg.depth * double + cfg.depth_single_blocks * single + modulation + embed + vectors))


def chip_peak(kind: str | None = None) -> float | None:
    """The bf16 peak FLOP/s of a chip of `kind` (default: this process's first device), None if unknown."""
    kind = jax.devices()[0].device_kind if kind is None else kind
    kind = DEVICE_KINDS.get(kind, kind)
    return next((peak for name, peak in BF16_PEAK.items() if name.lower() in kind.lower()), None)


def _inputs(cfg: FluxConfig, batch: int, size: int, l_txt: int):
    from fluxjax.sampling import sampler as sampling

    rng = np.random.default_rng(0)
    img = sampling.pack(rng.standard_normal((batch, 16, size // 8, size // 8), np.float32))
    txt = jnp.asarray(rng.standard_normal((batch, l_txt, cfg.context_in_dim), np.float32), jnp.bfloat16)
    vec = jnp.asarray(rng.standard_normal((batch, cfg.vec_in_dim), np.float32), jnp.bfloat16)
    guidance = jnp.full((batch,), 3.5, jnp.float32) if cfg.guidance_embed else None
    return img, sampling.image_ids(batch, size, size), txt, sampling.text_ids(batch, l_txt), vec, guidance


def _fluxjax(model_name: str, cfg: FluxConfig, sizes, batches, steps: int, attention: str, peak: float | None) -> None:
    from fluxjax.sampling import sampler as sampling
    from fluxjax.models.flux import Flux, param_shapes
    from fluxjax.loading.random_weights import device_random_params

    model = Flux(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, attention_impl=attention)
    l_txt = T5_LENGTH[model_name]
    params = device_random_params(param_shapes(model))
    for size in sizes:
        for batch in batches:
            img, img_ids, txt, txt_ids, vec, guidance = _inputs(cfg, batch, size, l_txt)
            sigmas = sampling.Schedule.dev().sigmas(steps, img.shape[1])
            args = (params, img, img_ids, txt, txt_ids, vec, sigmas, guidance)
            start = time.perf_counter()
            compiled = sampling.denoise.compile(model, *args)
            compile_s = time.perf_counter() - start
            step_s = median_time(lambda: compiled(model, *args).block_until_ready(), repeat=3) / steps
            flops = step_flops(cfg, batch, img.shape[1], l_txt)
            mfu = None if peak is None else flops / step_s / peak
            images_s = batch / (step_s * STEPS[model_name])
            stats = jax.devices()[0].memory_stats() or {}
            peak_mem = stats.get("peak_bytes_in_use")
            label = f"{model_name} {size}x{size} batch {batch} {attention_label(attention, cfg, img.shape[1] + l_txt)}"
            print(f"{label}: compile {compile_s:.1f} s, {step_s * 1e3:.1f} ms/step, {flops / 1e12:.1f} TFLOP/step, "
                  f"MFU {'n/a' if mfu is None else f'{mfu:.1%}'}, {images_s:.3f} images/s ({STEPS[model_name]} steps), "
                  f"peak memory {'n/a' if peak_mem is None else f'{peak_mem / 2**30:.1f} GiB'}", flush=True)
            record(f"{label}: step", step_s * 1e3, unit="ms")
            record(f"{label}: compile", compile_s, unit="s")
            if mfu is not None:
                record(f"{label}: MFU", 100 * mfu, unit="%")


def attention_label(attention: str, cfg: FluxConfig, seq_len: int, dtype=jnp.bfloat16) -> str:
    """The implementation's name; for "auto", with what it resolves to here ("auto (= cudnn)")."""
    if attention != "auto":
        return attention
    from fluxjax.models.attention import auto_implementation

    return f"auto (= {auto_implementation(dtype, cfg.hidden_size // cfg.num_heads, seq_len, masked=False, mesh_size=1)})"


def xla_flags_line() -> str:
    """The XLA_FLAGS in force and who set them, for a benchmark's header."""
    import os

    from fluxjax import runtime

    flags = os.environ.get("XLA_FLAGS")
    if flags is None:
        return "XLA_FLAGS unset"
    who = "set by fluxjax (fluxjax/runtime.py)" if runtime.APPLIED == flags else "the user's"
    return f"XLA_FLAGS={flags!r} ({who})"


def _diffusers(cfg: FluxConfig, size: int, batch: int, l_txt: int, compiled: bool = False) -> tuple[float, float | None]:
    """(seconds per bf16 step, seconds of the first call or None) of diffusers' transformer on
    the GPU (random weights): eager, or under torch.compile (the first call compiles)."""
    import torch
    from diffusers import FluxTransformer2DModel

    if not torch.cuda.is_available():
        raise RuntimeError("--compare-diffusers needs torch with CUDA and a GPU")
    with torch.device("cuda"):
        ref = FluxTransformer2DModel(guidance_embeds=cfg.guidance_embed, num_layers=cfg.depth,
                                     num_single_layers=cfg.depth_single_blocks).to(torch.bfloat16).eval()
    if compiled:
        ref = torch.compile(ref)
    l_img = (size // 16) ** 2
    ids = torch.zeros(l_img, 3, device="cuda")
    ids[:, 1] = torch.arange(l_img, device="cuda") // (size // 16)
    ids[:, 2] = torch.arange(l_img, device="cuda") % (size // 16)
    kw = dict(hidden_states=torch.randn(batch, l_img, 64, device="cuda", dtype=torch.bfloat16),
              encoder_hidden_states=torch.randn(batch, l_txt, 4096, device="cuda", dtype=torch.bfloat16),
              pooled_projections=torch.randn(batch, 768, device="cuda", dtype=torch.bfloat16),
              timestep=torch.full((batch,), 0.5, device="cuda", dtype=torch.bfloat16), img_ids=ids,
              txt_ids=torch.zeros(l_txt, 3, device="cuda"),
              guidance=torch.full((batch,), 3.5, device="cuda") if cfg.guidance_embed else None)

    def run():
        with torch.inference_mode():
            ref(**kw)
        torch.cuda.synchronize()

    first_s = None
    if compiled:
        start = time.perf_counter()
        run()
        first_s = time.perf_counter() - start
    return median_time(run, repeat=5, warmup=2), first_s


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="fluxjax bench fullsize", description=__doc__.split("\n\n")[0])
    on_cpu = jax.default_backend() == "cpu"
    parser.add_argument("--model", choices=("dev", "schnell", "tiny"), default="tiny" if on_cpu else "dev")
    parser.add_argument("--sizes", default="256" if on_cpu else "512,1024,2048", help="square image sizes in pixels")
    parser.add_argument("--batches", default="1,2" if on_cpu else "1,2,4")
    parser.add_argument("--steps", type=int, default=4, help="steps per timed loop")
    parser.add_argument("--attention", default="auto,xla_blocked" if on_cpu else "auto,xla",
                        help="implementations to time (auto: the default, printed with what it resolves to)")
    parser.add_argument("--compare-diffusers", action="store_true",
                        help="diffusers' bf16 step on the same GPU, eager and under torch.compile")
    args = parser.parse_args(argv)
    cfg = FluxConfig.preset(args.model)
    sizes = [int(s) for s in args.sizes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    peak = chip_peak()
    print(f"{args.model} on {jax.devices()[0].device_kind} ({jax.default_backend()}), bf16, random weights; "
          f"bf16 peak {'unknown' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'}; {xla_flags_line()}", flush=True)
    for attention in args.attention.split(","):
        _fluxjax(args.model, cfg, sizes, batches, args.steps, attention, peak)
    if args.compare_diffusers:
        if args.model == "tiny":
            raise SystemExit("--compare-diffusers compares the full-size models: use --model dev or schnell")
        for size in sizes:
            for batch in batches:
                for compiled in (False, True):
                    mode = "torch.compile" if compiled else "eager"
                    theirs, first_s = _diffusers(cfg, size, batch, T5_LENGTH[args.model], compiled)
                    label = f"diffusers {mode} {args.model} {size}x{size} batch {batch}"
                    record(f"{label}: step", theirs * 1e3, unit="ms")
                    line = f"{label} bf16: {theirs * 1e3:.1f} ms/step"
                    if first_s is not None:
                        record(f"{label}: compile (first call)", first_s, unit="s")
                        line += f", first call (compile) {first_s:.1f} s"
                    print(line, flush=True)
