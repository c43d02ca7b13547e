"""`fluxjax bench transformer`: one forward of fluxjax (jitted) against diffusers (eager), same
weights, same machine, same run; and the compile time of the full-size dev forward.

`--flux2` benchmarks FLUX.2 instead: diffusers' Flux2Transformer2DModel with FLUX.2 [klein]'s
settings (FluxConfig preset "flux2-klein-4b": 128 latent channels, SwiGLU, no biases, shared
modulation, 4 RoPE axes, its text width) at --hidden/--heads/--double/--single, no guidance.
klein-4B's full width is --hidden 3072 --heads 24 (5 double + 20 single blocks).

Needs the test extra (torch, diffusers) for the reference.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from fluxjax.bench.common import add_model_size_arguments, max_rel_error, median_times, report, rope_axes
from fluxjax.config import FluxConfig


def _reference_model(argv_args):
    """(diffusers transformer, its config dict, id columns) at the benchmark's sizes: FLUX.1's
    FluxTransformer2DModel, or with --flux2 Flux2Transformer2DModel with klein-4B's settings."""
    head_dim = argv_args.hidden // argv_args.heads
    sizes = dict(num_layers=argv_args.double, num_single_layers=argv_args.single, attention_head_dim=head_dim,
                 num_attention_heads=argv_args.heads)
    if argv_args.flux2:
        from diffusers import Flux2Transformer2DModel

        klein = FluxConfig.preset("flux2-klein-4b")
        axes = (head_dim // len(klein.axes_dim),) * len(klein.axes_dim)  # klein's (32,)*4 at head_dim 128
        cfg = dict(in_channels=klein.in_channels, joint_attention_dim=klein.context_in_dim, mlp_ratio=klein.mlp_ratio,
                   axes_dims_rope=axes, rope_theta=klein.theta, guidance_embeds=klein.guidance_embed, **sizes)
        return Flux2Transformer2DModel(**cfg).eval(), cfg, len(axes)
    from diffusers import FluxTransformer2DModel

    cfg = dict(in_channels=64, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
               axes_dims_rope=rope_axes(head_dim), **sizes)
    return FluxTransformer2DModel(**cfg).eval(), cfg, 3


def _small(argv_args) -> None:
    import torch

    from fluxjax.loading.registry import load_transformer

    torch.set_num_threads(argv_args.threads)
    reference, cfg, columns = _reference_model(argv_args)
    side = int(argv_args.img_tokens**0.5)
    l_img, l_txt = side * side, argv_args.txt_tokens
    gen = torch.Generator().manual_seed(0)
    # ids as the pipelines lay them out: image (0, row, col[, 0]); text zeros (FLUX.1) or (0, 0, 0, index)
    img_ids = torch.zeros(side, side, columns)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None]
    txt_ids = torch.zeros(l_txt, columns)
    if columns == 4:
        txt_ids[:, 3] = torch.arange(l_txt)
    inputs = dict(
        hidden_states=torch.randn(1, l_img, cfg["in_channels"], generator=gen),
        encoder_hidden_states=torch.randn(1, l_txt, cfg["joint_attention_dim"], generator=gen),
        timestep=torch.tensor([0.5]), img_ids=img_ids.reshape(-1, columns), txt_ids=txt_ids,
        guidance=torch.tensor([3.5]) if cfg["guidance_embeds"] else None,
    )
    if not argv_args.flux2:
        inputs["pooled_projections"] = torch.randn(1, 768, generator=gen)
    with tempfile.TemporaryDirectory() as folder:
        reference.save_pretrained(folder)
        m, p = load_transformer(folder)

    j = lambda t: None if t is None else jnp.asarray(t.numpy())  # noqa: E731
    args = (
        j(inputs["hidden_states"]), j(inputs["img_ids"])[None], j(inputs["encoder_hidden_states"]),
        j(inputs["txt_ids"])[None], j(inputs["timestep"]), j(inputs.get("pooled_projections")), j(inputs["guidance"]),
    )
    print(f"{'FLUX.2 klein-4B settings' if argv_args.flux2 else 'small config'}: hidden {argv_args.hidden}, "
          f"{argv_args.heads} heads, {argv_args.double} double + "
          f"{argv_args.single} single blocks, {l_img} image + {l_txt} text tokens, fp32, random weights, "
          f"{argv_args.threads} torch threads")

    def run_reference():
        with torch.no_grad():
            return reference(**inputs).sample

    theirs = run_reference().numpy()
    start = time.perf_counter()
    compiled = jax.jit(m.apply).lower({"params": p}, *args).compile()
    compile_s = time.perf_counter() - start
    ours = np.asarray(compiled({"params": p}, *args))
    print(f"  compile {compile_s:.2f} s, "
          f"max |fluxjax - diffusers| / max |diffusers| = {max_rel_error(ours, theirs):.2e}")
    t_ref, t_ours = median_times([run_reference, lambda: compiled({"params": p}, *args).block_until_ready()],
                                 argv_args.repeat)
    report("  forward", t_ours, t_ref, "diffusers eager")


def _full_size_compile(resolution: int, name: str) -> None:
    from fluxjax.models.flux import Flux, param_shapes  # the scanned layers: what accelerators run

    cfg = FluxConfig.preset(name)
    model = Flux(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    l_img, l_txt = (resolution // 16) ** 2, 512 if name == "dev" else 256
    spec = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
    params = param_shapes(model)
    args = (spec(1, l_img, 64), spec(1, l_img, 3, dtype=jnp.float32), spec(1, l_txt, 4096),
            spec(1, l_txt, 3, dtype=jnp.float32), spec(1), spec(1, 768), spec(1) if cfg.guidance_embed else None)
    start = time.perf_counter()
    lowered = jax.jit(model.apply).lower({"params": params}, *args)
    lowered_s = time.perf_counter() - start
    lowered.compile()
    total = time.perf_counter() - start
    print(f"full-size {name} forward at {resolution}x{resolution}, bf16, from abstract shapes: "
          f"lower {lowered_s:.1f} s, lower+compile {total:.1f} s (target < 20 s) on {jax.devices()[0].platform}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="fluxjax bench transformer", description=__doc__)
    add_model_size_arguments(p, hidden=768, heads=12)
    p.add_argument("--img-tokens", type=int, default=1024, help="a square number (token grid side^2)")
    p.add_argument("--txt-tokens", type=int, default=128)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    p.add_argument("--resolution", type=int, default=1024, help="full-size compile check resolution")
    p.add_argument("--skip-full-size", action="store_true")
    p.add_argument("--flux2", action="store_true",
                   help="FLUX.2: diffusers' Flux2Transformer2DModel with klein-4B's settings (full width: --hidden 3072 "
                        "--heads 24); skips the FLUX.1 full-size compile")
    args = p.parse_args(argv)
    _small(args)
    if not args.skip_full_size and not args.flux2:
        _full_size_compile(args.resolution, "dev")


if __name__ == "__main__":
    main()
