"""The quantized tiny pipeline under fsdp on 8 simulated CPU devices; prints JSON facts.

Run by tests/test_quantize.py in a subprocess (the device count must be set before jax is
imported): `python tests/quantize_sharding_worker.py`. For int8 and fp8 it prints the max abs pixel
error of the fsdp pipeline against the one-device pipeline (float32 compute), and for every
quantized Linear of the transformer and T5: its kernel's dtype, and the shardings of its kernel
and kernel_scale beside those the unquantized pipeline gives its kernel and bias (the scale has
the bias's logical axis). The test decides what is right.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["FLUXJAX_COMPILATION_CACHE"] = "off"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from fluxjax.loading.checkpoint import flat  # noqa: E402
from fluxjax.pipeline.pipeline import FluxPipeline  # noqa: E402

PROMPTS = ["a red square", "a blue circle", "a green triangle"]  # 3: padded to the 8 data shards
KW = dict(height=32, width=48, num_steps=2, seed=0, max_sequence_length=16, output="np")


def spec(x) -> list:
    return [list(d) if isinstance(d, tuple) else d for d in x.sharding.spec]


def linears(pipe, plain) -> dict:
    out = {}
    for name in ("transformer", "t5"):
        q, p = flat(getattr(pipe, name).params), flat(getattr(plain, name).params)
        for path in q:
            if path.endswith("/kernel_scale"):
                base = path[: -len("kernel_scale")]
                out[f"{name}:{base}"] = dict(
                    dtype=str(q[base + "kernel"].dtype), scale_dtype=str(q[path].dtype),
                    kernel_spec=spec(q[base + "kernel"]), plain_kernel_spec=spec(p[base + "kernel"]),
                    scale_spec=spec(q[path]), plain_bias_spec=spec(p[base + "bias"]) if base + "bias" in p else None,
                    kernel_shard=list(q[base + "kernel"].addressable_shards[0].data.shape),
                    kernel_shape=list(q[base + "kernel"].shape))
    return out


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    plain = FluxPipeline.from_pretrained("tiny", dtype="float32", sharding="fsdp")
    facts = {"devices": jax.device_count()}
    for mode in ("int8", "fp8"):
        single = FluxPipeline.from_pretrained("tiny", dtype="float32", quantize=mode)
        pipe = FluxPipeline.from_pretrained("tiny", dtype="float32", sharding="fsdp", quantize=mode)
        reference, images = single(PROMPTS, **KW), pipe(PROMPTS, **KW)
        facts[mode] = dict(error=float(np.abs(images - reference).max()), max_pixel=float(np.abs(reference).max()),
                           linears=linears(pipe, plain))
    print(json.dumps(facts))


if __name__ == "__main__":
    main()
