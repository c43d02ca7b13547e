"""A small random Qwen3 encoder under every shipped strategy on 8 simulated CPU devices gives the
one-device prompt embeddings."""

import jax
import numpy as np

from fluxjax.loading.random_weights import host_random_params
from fluxjax.models.qwen3 import Qwen3Config, Qwen3Encoder, encode_prompts, param_shapes
from fluxjax.parallel.strategies import Strategy, available, jit_with_rules

encode_prompts_jit = jit_with_rules(encode_prompts, static_argnames=("model", "layers", "dtype"))

# 8 query heads in 4 k/v groups: tp over up to 8 devices splits whole heads (and k/v features).
CONFIG = Qwen3Config.preset("tiny").replace(num_attention_heads=8, num_key_value_heads=4, head_dim=8)
BATCH, LENGTH, LAYERS = 3, 12, (1, 2, 4)  # 3 divides no data axis above 1: every case pads


def test_every_strategy_gives_the_one_device_result():
    """dp, fsdp, tp, fsdp_tp and the sp_* strategies, a batch of 3 padded to each data size,
    prompts padded."""
    model = Qwen3Encoder(CONFIG)
    boxed = param_shapes(model)
    params = host_random_params(boxed, seed=1)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, CONFIG.vocab_size, (BATCH, LENGTH)).astype(np.int32)
    mask = (np.arange(LENGTH)[None] < np.array([[LENGTH], [5], [9]])).astype(np.int32)  # right padding
    ref = np.asarray(encode_prompts_jit(model, jax.device_put(params, jax.devices()[0]), ids, mask, LAYERS))
    max_abs = float(np.abs(ref).max())
    shards = {}
    for name in available():
        strategy = Strategy.load(name)
        mesh = strategy.make_mesh()
        sharded = jax.device_put(params, strategy.param_shardings(mesh)(boxed))
        with strategy.activate(mesh):
            (ids_d, mask_d), n = strategy.put_batch((ids, mask), mesh)
            out = np.asarray(encode_prompts_jit(model, sharded, ids_d, mask_d, LAYERS))[:n]
        # measured 0 (dp, fsdp) to 1.0e-6 (tp: sums split over devices, in another order)
        err = float(np.abs(out - ref).max())
        assert err <= 1e-5 * max_abs, (name, dict(mesh.shape), err)
        kernel = sharded["layers"]["self_attn"]["q_proj"]["kernel"]
        shards[name] = list(kernel.sharding.shard_shape(kernel.shape))
    assert shards["tp"] == [4, 32, 8]  # the heads split 8 ways
    assert shards["fsdp"] == [4, 4, 64]  # the width split 8 ways
