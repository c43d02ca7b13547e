"""LoRA fused and live under the fsdp strategy on 8 simulated CPU devices; print JSON facts.

Run by tests/test_lora.py in a subprocess (the device count must be set before jax is
imported): `python tests/lora_sharding_worker.py DIR` writes a kohya-layout LoRA on every
Linear of the tiny transformer into DIR and prints one JSON object: the single-device errors of
live against fused (scanned blocks), the fsdp errors against one device, each fused kernel's
global and per-device shapes, and whether the compiled fuse of each kernel names its full shape
anywhere (it would if a device ever held it whole). The test decides what is right.
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
from fluxjax.lora import adapters as lora, fused as lora_fused, live as lora_live  # noqa: E402
from fluxjax.bench.lora import write_random_lora  # noqa: E402
from fluxjax.config import FluxConfig  # noqa: E402
from fluxjax.models.flux import param_shapes  # noqa: E402
from fluxjax.models.flux import Flux  # noqa: E402
from fluxjax.loading.random_weights import host_random_params  # noqa: E402
from fluxjax.parallel.strategies import Strategy  # noqa: E402
from transformer_inputs import random_inputs  # noqa: E402

BATCH, GRID, L_TXT, RANK = 8, (4, 6), 5, 4


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    cfg = FluxConfig.preset("tiny")
    model = Flux(cfg)
    boxed = param_shapes(model)
    params = jax.device_put(host_random_params(boxed, seed=1))
    path = os.path.join(sys.argv[1], "lora.safetensors")
    write_random_lora(path, cfg, RANK)
    adapters = lora.load_loras([path], cfg, params)

    rng = np.random.default_rng(0)
    inputs = random_inputs(cfg, BATCH, GRID, L_TXT, rng)
    scales = np.full((BATCH, 1), 0.8, np.float32)

    def run_live(p, tree, s, *x):
        with lora_live.live(s):
            return model.apply(lora_live.variables(p, tree), *x)

    plain = jax.jit(lambda p, *x: model.apply({"params": p}, *x))
    fused_one = lora_fused.fuse(params, adapters, [0.8])
    ref = np.asarray(plain(fused_one, *inputs))
    live_one = np.asarray(jax.jit(run_live)(params, adapters.tree, scales, *inputs))
    base = np.asarray(plain(params, *inputs))

    strategy = Strategy.load("fsdp")
    mesh = strategy.make_mesh()
    sharded = jax.device_put(params, strategy.param_shardings(mesh)(boxed))
    fused = lora_fused.fuse(sharded, adapters, [0.8])
    batch, _ = strategy.put_batch(inputs, mesh)
    with strategy.activate(mesh):
        fused_out = np.asarray(plain(fused, *batch))
        live_out = np.asarray(jax.jit(run_live)(sharded, adapters.tree, scales, *batch))

    kernels, full_shape_in_hlo = {}, {}
    flat_fused = dict(jax.tree_util.tree_flatten_with_path(fused)[0])
    for p, before in jax.tree_util.tree_flatten_with_path(sharded)[0]:
        name = jax.tree_util.keystr(p, simple=True, separator="/")
        if not name.endswith("kernel"):
            continue
        after = flat_fused[p]
        kernels[name] = {"shape": list(after.shape), "shard": list(after.addressable_shards[0].data.shape),
                         "same_sharding": after.sharding == before.sharding,
                         "param_error": float(np.abs(np.asarray(after) - np.asarray(dict(
                             jax.tree_util.tree_flatten_with_path(fused_one)[0])[p])).max())}
        # The compiled fuse of this kernel, as `lora_fused.fuse` runs it.
        node = adapters.tree
        for k in p[:-1]:
            node = node[k.key]
        bias_path = p[:-1] + (jax.tree_util.DictKey("bias"),)
        bias = dict(jax.tree_util.tree_flatten_with_path(sharded)[0]).get(bias_path)
        fn = jax.jit(lora_fused._fused, out_shardings=(before.sharding, None if bias is None else bias.sharding))
        text = fn.lower(before, bias, node["a"], node["b"], node["scale"], node["bias"], np.ones(1, np.float32)).compile().as_text()
        full_shape_in_hlo[name] = f"f32[{','.join(map(str, before.shape))}]" in text
        if name == "double_blocks/img_attn/qkv/kernel":  # the check's control: a fuse that gathers
            gathered = jax.jit(lora_fused._fused, out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
            text = gathered.lower(before, bias, node["a"], node["b"], node["scale"], node["bias"], np.ones(1, np.float32))
            control = f"f32[{','.join(map(str, before.shape))}]" in text.compile().as_text()
    print(json.dumps({
        "lora_effect": float(np.abs(ref - base).max()),
        "live_vs_fused_one_device": float(np.abs(live_one - ref).max()),
        "fsdp_fused_error": float(np.abs(fused_out - ref).max()),
        "fsdp_live_error": float(np.abs(live_out - ref).max()),
        "kernels": kernels,
        "full_shape_in_hlo": full_shape_in_hlo,
        "control_gathered_full_shape_in_hlo": control,
    }))


if __name__ == "__main__":
    main()
