"""VAE decode time: fluxjax (jitted) against diffusers' AutoencoderKL (eager), same weights, fp32.

A small AutoencoderKL of the FLUX structure gets random weights, is saved with save_pretrained
and loaded through `fluxjax.loading.vae.load_vae`, so both sides run the same numbers; the outputs are
compared before timing. Needs the test extras (torch, diffusers).

    python -m fluxjax.bench.vae [--widths 64,128,128,128] [--latent 16] [--batch 1] [--repeat 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from fluxjax.bench.common import max_rel_error, median_time, report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="fluxjax bench vae", description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="64,128,128,128", help="block_out_channels (FLUX: 128,256,512,512)")
    parser.add_argument("--groups", type=int, default=32, help="norm_num_groups")
    parser.add_argument("--latent", type=int, default=16, help="latent height and width (image = 8x)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import torch
    from diffusers import AutoencoderKL

    from fluxjax.loading.registry import load_vae

    if args.threads:
        torch.set_num_threads(args.threads)
    widths = tuple(int(w) for w in args.widths.split(","))
    n = len(widths)
    scale, shift = 0.3611, 0.1159
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=widths,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=2, norm_num_groups=args.groups, scaling_factor=scale, shift_factor=shift,
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
    ).eval()
    z = torch.randn(args.batch, 16, args.latent, args.latent, generator=torch.Generator().manual_seed(1))

    with tempfile.TemporaryDirectory() as folder:
        vae.save_pretrained(folder)
        model, params = load_vae(folder, dtype="float32")

    decode = jax.jit(lambda p, z: model.apply({"params": p}, z, method="decode"))
    z_jax = jnp.asarray(z.permute(0, 2, 3, 1).numpy())
    start = time.perf_counter()
    compiled = decode.lower(params, z_jax).compile()
    compile_s = time.perf_counter() - start

    def run_jax():
        return compiled(params, z_jax).block_until_ready()

    @torch.no_grad()
    def run_torch():
        return vae.decode(z / scale + shift).sample

    ours, ref = np.asarray(run_jax()), run_torch().permute(0, 2, 3, 1).numpy()
    err = max_rel_error(ours, ref)
    side = 8 * args.latent
    print(
        f"VAE decode, widths {list(widths)}, batch {args.batch}, latent {args.latent}x{args.latent} -> "
        f"{side}x{side} px, fp32 on {jax.devices()[0].platform}: compile {compile_s:.2f} s, "
        f"max rel error vs diffusers {err:.1e}",
        flush=True,
    )
    t_jax = median_time(run_jax, repeat=args.repeat)
    t_torch = median_time(run_torch, repeat=args.repeat)
    report("vae decode", t_jax, t_torch, reference="diffusers (eager)")


if __name__ == "__main__":
    main()
