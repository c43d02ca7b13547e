"""LoRA fused and live under the fsdp strategy on 8 simulated CPU devices: the single-device
result, and a fuse that runs shard by shard (a kohya-layout LoRA on every Linear of the tiny
transformer)."""

import jax
import numpy as np
import pytest

from fluxjax.bench.lora import write_random_lora
from fluxjax.config import FluxConfig
from fluxjax.loading.random_weights import host_random_params
from fluxjax.lora import adapters as lora, fused as lora_fused, live as lora_live
from fluxjax.models.flux import Flux, param_shapes
from fluxjax.parallel.strategies import Strategy
from transformer_inputs import random_inputs

pytestmark = pytest.mark.slow  # minutes of compiles on a loaded CPU: outside the fast tier

BATCH, GRID, L_TXT, RANK = 8, (4, 6), 5, 4


def test_fsdp_fuses_shard_by_shard_and_runs_live(tmp_path):
    """Fusing under fsdp equals fusing on one device, each fused kernel keeps its sharding, 1/8
    per device, and no compiled fuse ever names a whole kernel's shape; live under fsdp equals
    fused; live equals fused on the scanned blocks."""
    cfg = FluxConfig.preset("tiny")
    model = Flux(cfg)
    boxed = param_shapes(model)
    params = jax.device_put(host_random_params(boxed, seed=1))
    path = str(tmp_path / "lora.safetensors")
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
    assert float(np.abs(ref - base).max()) > 0.1  # the LoRA changes the output
    # Measured: 5e-6 / 4e-6 / 5e-6 on outputs of magnitude ~4 (float32 reassociation).
    assert float(np.abs(live_one - ref).max()) < 1e-4
    assert float(np.abs(fused_out - ref).max()) < 1e-4 and float(np.abs(live_out - ref).max()) < 1e-4
    assert control, "the HLO check must see a kernel that is gathered"
    for name, k in kernels.items():
        assert k["same_sharding"] and k["param_error"] < 1e-6, name
        assert np.prod(k["shard"]) * 8 == np.prod(k["shape"]), f"{name}: {k}"
        assert not full_shape_in_hlo[name], f"{name} is held whole by the compiled fuse"
