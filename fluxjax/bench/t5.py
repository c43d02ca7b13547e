"""T5 encode time: fluxjax (jitted) against transformers' T5EncoderModel (eager), same weights, fp32.

A small T5 v1.1 encoder gets random weights, is saved with save_pretrained and loaded through
`fluxjax.loading.t5.load_t5`, so both sides run the same numbers; the outputs are compared before
timing. Needs the test extras (torch).

    python -m fluxjax.bench.t5 [--d-model 512] [--heads 8] [--layers 6] [--d-ff 1024]
                               [--batch 2] [--length 256] [--repeat 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from fluxjax.bench.common import max_rel_error, median_time, report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="fluxjax bench t5", description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=512, help="model width (XXL: 4096)")
    parser.add_argument("--heads", type=int, default=8, help="attention heads (XXL: 64)")
    parser.add_argument("--d-kv", type=int, default=0, help="per-head width (0: d_model / heads)")
    parser.add_argument("--layers", type=int, default=6, help="encoder layers (XXL: 24)")
    parser.add_argument("--d-ff", type=int, default=1024, help="feed-forward width (XXL: 10240)")
    parser.add_argument("--vocab", type=int, default=32128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=256, help="tokens (FLUX: 256 schnell, 512 dev)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--attn", default="eager,sdpa",
        help="transformers attention implementations to time (on CPU its default 'sdpa' is the slower)",
    )
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import torch
    import transformers

    from fluxjax.loading.registry import load_t5

    if args.threads:
        torch.set_num_threads(args.threads)
    d_kv = args.d_kv or args.d_model // args.heads
    torch.manual_seed(0)
    reference = transformers.T5EncoderModel(
        transformers.T5Config(
            vocab_size=args.vocab, d_model=args.d_model, d_kv=d_kv, d_ff=args.d_ff, num_layers=args.layers,
            num_heads=args.heads, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        )
    ).eval()
    ids = np.random.default_rng(1).integers(0, args.vocab, size=(args.batch, args.length)).astype(np.int32)

    with tempfile.TemporaryDirectory() as folder:
        reference.save_pretrained(folder)
        model, params = load_t5(folder, dtype="float32")

    encode = jax.jit(lambda p, ids: model.apply({"params": p}, ids))
    ids_jax = jnp.asarray(ids)
    start = time.perf_counter()
    compiled = encode.lower(params, ids_jax).compile()
    compile_s = time.perf_counter() - start
    ids_torch = torch.from_numpy(ids).long()

    def run_jax():
        return compiled(params, ids_jax).block_until_ready()

    @torch.inference_mode()
    def run_torch():
        return reference(input_ids=ids_torch).last_hidden_state

    ours, ref = np.asarray(run_jax()), run_torch().numpy()
    err = max_rel_error(ours, ref)
    print(
        f"T5 encode, d_model {args.d_model}, {args.heads} heads x {d_kv}, {args.layers} layers, d_ff {args.d_ff}, "
        f"batch {args.batch} x {args.length} tokens, fp32 on {jax.devices()[0].platform}: "
        f"compile {compile_s:.2f} s, max rel error vs transformers {err:.1e}",
        flush=True,
    )
    t_jax = median_time(run_jax, repeat=args.repeat)
    for attn in args.attn.split(","):
        reference.set_attn_implementation(attn)
        t_torch = median_time(run_torch, repeat=args.repeat)
        report("t5 encode", t_jax, t_torch, reference=f"transformers (eager mode, {attn} attention)")


if __name__ == "__main__":
    main()
