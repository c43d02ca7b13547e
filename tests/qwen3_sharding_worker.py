"""Run a small random Qwen3 encoder under every shipped strategy on 8 simulated CPU devices;
print JSON facts.

Run by tests/test_qwen3.py in a subprocess, since the device count must be set before jax is
imported: `python tests/qwen3_sharding_worker.py` (it sets XLA_FLAGS itself). Prints one JSON
object: the single-device result's max |value| and, per strategy, the max abs error of the
prompt embeddings against it and the layout of a kernel. The test decides what is right.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from fluxjax.models.qwen3 import Qwen3Config, Qwen3Encoder, encode_prompts, param_shapes  # noqa: E402
from fluxjax.loading.random_weights import host_random_params  # noqa: E402
from fluxjax.parallel.strategies import Strategy, available, jit_with_rules  # noqa: E402

encode_prompts_jit = jit_with_rules(encode_prompts, static_argnames=("model", "layers", "dtype"))

# 8 query heads in 4 k/v groups: tp over up to 8 devices splits whole heads (and k/v features).
CONFIG = Qwen3Config.preset("tiny").replace(num_attention_heads=8, num_key_value_heads=4, head_dim=8)
BATCH, LENGTH, LAYERS = 3, 12, (1, 2, 4)  # 3 divides no data axis above 1: every case pads


def main():
    model = Qwen3Encoder(CONFIG)
    boxed = param_shapes(model)
    params = host_random_params(boxed, seed=1)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, CONFIG.vocab_size, (BATCH, LENGTH)).astype(np.int32)
    mask = (np.arange(LENGTH)[None] < np.array([[LENGTH], [5], [9]])).astype(np.int32)  # right padding
    ref = np.asarray(encode_prompts_jit(model, jax.device_put(params, jax.devices()[0]), ids, mask, LAYERS))
    facts = {"max_abs": float(np.abs(ref).max()), "cases": {}}
    for name in available():
        strategy = Strategy.load(name)
        mesh = strategy.make_mesh()
        sharded = jax.device_put(params, strategy.param_shardings(mesh)(boxed))
        with strategy.activate(mesh):
            (ids_d, mask_d), n = strategy.put_batch((ids, mask), mesh)
            out = np.asarray(encode_prompts_jit(model, sharded, ids_d, mask_d, LAYERS))[:n]
        kernel = sharded["layers"]["self_attn"]["q_proj"]["kernel"]
        facts["cases"][name] = {"mesh": dict(mesh.shape), "err": float(np.abs(out - ref).max()),
                                "q_proj_shard": list(kernel.sharding.shard_shape(kernel.shape))}
    print(json.dumps(facts))


if __name__ == "__main__":
    main()
