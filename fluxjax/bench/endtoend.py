"""`fluxjax bench endtoend`: prompt to pixels with every full-size model, random bf16 weights.

T5-XXL, CLIP-L, the FLUX transformer and the VAE, drawn on the device (no checkpoint needed),
through fluxjax's FluxPipeline: dev, 28 steps, 1024x1024, batch 1 and 4 by default. For each
batch: the first call (compiling text encoding, the denoise loop and decoding), then the median
of timed calls: seconds per image, images per second, the time of each stage, peak device memory,
and the attention "auto" resolved to. With `--compare-diffusers`, diffusers' FluxPipeline with
the same model sizes (random weights, bf16, same size, steps and batch) in the same run, eager and
with its transformer under torch.compile (first call reported as its compile time).

On a CPU the full models do not fit: the section then runs the `tiny` preset, which exercises
every line of the harness (diffusers' side included, on the CPU, when asked).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp

from fluxjax.bench.common import median_time, record
from fluxjax.bench.fullsize import attention_label, xla_flags_line

PROMPT = "a photo of a red fox in the snow, golden hour"


def random_pipeline(preset: str, dtype=jnp.bfloat16, attention_impl: str = "auto"):
    """fluxjax's FluxPipeline of preset `preset` ("dev", "schnell", "tiny") with random weights drawn
    on the default device (fluxjax.loading.random_weights.device_random_params), the tiny tokenizers (their
    ids fit every vocabulary) and the preset's schedule and defaults."""
    from fluxjax.sampling import sampler as sampling
    from fluxjax.loading.registry import COMPONENTS, PRESETS, abstract_params, build
    from fluxjax.pipeline.pipeline import Component, FluxPipeline
    from fluxjax.loading.random_weights import device_random_params
    from fluxjax.pipeline.text import PromptTokenizer
    from fluxjax.pipeline.tiny_tokenizers import make_tokenizers

    with tempfile.TemporaryDirectory() as folder:
        make_tokenizers(folder)
        tokenizer = PromptTokenizer.from_folder(folder)
    components = {}
    for seed, (name, config_preset) in enumerate(PRESETS[preset].items()):
        spec = COMPONENTS[name]
        options = spec.select(dict(attention_impl=attention_impl))
        model = build(name, spec.config.preset(config_preset), dtype, **options)
        components[name] = Component(model, device_random_params(abstract_params(name, model), seed, neutral_vectors=True))
    schedule = sampling.Schedule.dev() if preset != "schnell" else sampling.Schedule.schnell()
    return FluxPipeline(**components, tokenizer=tokenizer, schedule=schedule, kind=preset, name=f"random {preset}")


def _peak_memory() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def _measure(label: str, run, batch: int, repeat: int, first: str, peak_bytes, detail=lambda: "") -> None:
    """Time `run()` (one blocking call making `batch` images): its first call, then the median of
    `repeat` more. Print and record seconds per image, images/s, the first call (named `first`)
    and peak memory (`peak_bytes()`: bytes, or None where unknown); `detail()` adds to the line."""
    start = time.perf_counter()
    run()
    first_s = time.perf_counter() - start
    batch_s = median_time(run, repeat=repeat, warmup=0)
    peak = peak_bytes()
    print(f"{label}: {first} {first_s:.1f} s, {batch_s / batch:.2f} s/image, {batch / batch_s:.3f} images/s"
          f"{detail()}, peak memory {'n/a' if peak is None else f'{peak / 2**30:.1f} GiB'}", flush=True)
    record(f"{label}: per image", batch_s / batch, unit="s")
    record(f"{label}: images/s", batch / batch_s, unit="images/s")
    record(f"{label}: {first}", first_s, unit="s")
    if peak is not None:
        record(f"{label}: peak memory", peak / 2**30, unit="GiB")


def _fluxjax(pipe, preset: str, size: int, batch: int, steps: int, repeat: int) -> None:
    prompts = [PROMPT] * batch

    def run():
        pipe(prompts, height=size, width=size, num_steps=steps, output="np")

    seq_len = (size // 16) ** 2 + pipe.defaults.max_sequence_length
    label = (f"fluxjax {preset} {size}x{size} {steps} steps batch {batch} "
             f"{attention_label(pipe.transformer.model.attention_impl, pipe.transformer.model.config, seq_len)}")
    stages = lambda: " (" + ", ".join(f"{k} {v:.2f} s" for k, v in pipe.timings.items()) + ")"  # noqa: E731
    _measure(label, run, batch, repeat, "first call (compile)", _peak_memory, stages)


def reference_pipeline(preset: str, device: str):
    """diffusers' FluxPipeline with the sizes of fluxjax's preset `preset`, random weights (the
    libraries' own init), bf16, on `device`; tokenizers as random_pipeline's."""
    import torch
    import transformers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from diffusers import FluxPipeline as DiffusersFluxPipeline
    from diffusers import FluxTransformer2DModel

    from fluxjax.config import AutoEncoderConfig, CLIPConfig, FluxConfig, T5Config
    from fluxjax.loading.registry import PRESETS
    from fluxjax.testing.reference import SCHEDULERS
    from fluxjax.pipeline.tiny_tokenizers import make_tokenizers

    names = PRESETS[preset]
    f, t, c, v = (FluxConfig.preset(names["transformer"]), T5Config.preset(names["t5"]),
                  CLIPConfig.preset(names["clip"]), AutoEncoderConfig.preset(names["vae"]))
    with torch.device(device):
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=f.in_channels, num_layers=f.depth, num_single_layers=f.depth_single_blocks,
            attention_head_dim=f.hidden_size // f.num_heads, num_attention_heads=f.num_heads,
            joint_attention_dim=f.context_in_dim, pooled_projection_dim=f.vec_in_dim,
            guidance_embeds=f.guidance_embed, axes_dims_rope=tuple(f.axes_dim))
        vae = AutoencoderKL(
            in_channels=v.in_channels, out_channels=v.out_ch, latent_channels=v.z_channels,
            block_out_channels=tuple(v.ch * m for m in v.ch_mult), layers_per_block=v.num_res_blocks,
            down_block_types=("DownEncoderBlock2D",) * len(v.ch_mult), up_block_types=("UpDecoderBlock2D",) * len(v.ch_mult),
            norm_num_groups=v.norm_num_groups, scaling_factor=v.scale_factor, shift_factor=v.shift_factor,
            use_quant_conv=False, use_post_quant_conv=False)
        clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
            max_position_embeddings=c.max_position_embeddings, hidden_act=c.hidden_act, eos_token_id=c.eos_token_id))
        t5 = transformers.T5EncoderModel(transformers.T5Config(
            vocab_size=t.vocab_size, d_model=t.d_model, d_kv=t.d_kv, d_ff=t.d_ff, num_layers=t.num_layers,
            num_heads=t.num_heads, feed_forward_proj="gated-gelu", dropout_rate=0.0))
    with tempfile.TemporaryDirectory() as folder:
        make_tokenizers(folder)
        tokenizer = transformers.CLIPTokenizer.from_pretrained(f"{folder}/tokenizer")
        tokenizer_2 = transformers.T5TokenizerFast.from_pretrained(f"{folder}/tokenizer_2")
    kind = "schnell" if preset == "schnell" else "dev"
    pipe = DiffusersFluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULERS[kind]), vae=vae,
                                 text_encoder=clip, tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer_2,
                                 transformer=transformer)
    pipe = pipe.to(torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers(preset: str, sizes, batches, steps: int, repeat: int, modes, t5_length: int, guidance) -> None:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = reference_pipeline(preset, device)
    eager_transformer = pipe.transformer
    for mode in modes:
        pipe.transformer = torch.compile(eager_transformer) if mode == "compiled" else eager_transformer
        for size in sizes:
            for batch in batches:
                def run():
                    with torch.inference_mode():
                        pipe(prompt=[PROMPT] * batch, height=size, width=size, num_inference_steps=steps,
                             guidance_scale=3.5 if guidance is None else guidance, max_sequence_length=t5_length,
                             output_type="np")
                    if device == "cuda":
                        torch.cuda.synchronize()

                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                label = f"diffusers {mode} {preset} {size}x{size} {steps} steps batch {batch}"
                _measure(label, run, batch, repeat, "first call (compile)" if mode == "compiled" else "first call",
                         lambda: torch.cuda.max_memory_allocated() if device == "cuda" else None)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="fluxjax bench endtoend", description=__doc__.split("\n\n")[0])
    on_cpu = jax.default_backend() == "cpu"
    parser.add_argument("--model", choices=("dev", "schnell", "tiny"), default="tiny" if on_cpu else "dev")
    parser.add_argument("--sizes", default="256" if on_cpu else "1024", help="square image sizes in pixels")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's, dev 28)")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls after the first")
    parser.add_argument("--attention", default="auto", help="fluxjax's attention implementation")
    parser.add_argument("--compare-diffusers", action="store_true",
                        help="diffusers' FluxPipeline at the same sizes in the same run (needs the test extra)")
    parser.add_argument("--diffusers-modes", default="eager,compiled",
                        help="with --compare-diffusers: eager, compiled (torch.compile of the transformer) or both")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    modes = args.diffusers_modes.split(",")
    if set(modes) - {"eager", "compiled"}:
        raise SystemExit(f"--diffusers-modes takes eager and/or compiled, got {args.diffusers_modes!r}")
    print(f"{args.model} end to end on {jax.devices()[0].device_kind} ({jax.default_backend()}), bf16, random weights; "
          f"{xla_flags_line()}", flush=True)
    start = time.perf_counter()
    pipe = random_pipeline(args.model, attention_impl=args.attention)
    print(f"random weights drawn in {time.perf_counter() - start:.1f} s", flush=True)
    steps = pipe.defaults.num_steps if args.steps is None else args.steps
    for size in sizes:
        for batch in batches:
            _fluxjax(pipe, args.model, size, batch, steps, args.repeat)
    if args.compare_diffusers:
        defaults = pipe.defaults
        del pipe  # its device memory goes to the reference
        _diffusers(args.model, sizes, batches, steps, args.repeat, modes, defaults.max_sequence_length,
                   defaults.guidance)
