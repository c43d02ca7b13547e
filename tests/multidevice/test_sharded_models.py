"""Sharding strategies on 8 simulated CPU devices: the tiny models (Flux, T5, CLIP, VAE) under every
shipped strategy and mesh give the single-device result, with the layouts each strategy's table
promises."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fluxjax.config import AutoEncoderConfig, CLIPConfig, FluxConfig, T5Config
from fluxjax.loading.random_weights import host_random_params
from fluxjax.models.autoencoder import AutoEncoder
from fluxjax.models.clip import CLIPTextEncoder
from fluxjax.models.flux import Flux
from fluxjax.models.attention import dot_product_attention
from fluxjax.models.t5 import T5Encoder
from fluxjax.parallel.strategies import Strategy
from transformer_inputs import random_inputs

SHIPPED = ("dp", "fsdp", "tp", "fsdp_tp")
FP32_ABS_TOL = 1e-5  # what the issue asks of a sharded run against one device

# (strategy, ici shape, whether the text encoders and VAE run too: they are checked once per
# strategy to keep the test fast; the transformer on every mesh)
CASES = [
    ("dp", (8,), True),
    ("fsdp", (8,), True),
    ("tp", (1, 8), True),
    ("tp", (2, 4), False),
    ("tp", (4, 2), False),
    ("fsdp_tp", (4, 2), True),
    ("fsdp_tp", (2, 4), False),
    ("fsdp_tp", (8, 1), False),
]
BATCH = 3  # divides no data axis above 1: every case pads
GRID, L_TXT = (4, 6), 5


def init(model, *inputs):
    """(boxed abstract params, random params) of `model`: fluxjax.loading.random_weights' rule, nonzero
    everywhere, so a misplaced shard would show in the result."""
    boxed = jax.eval_shape(model.init, jax.random.key(0), *inputs)["params"]
    return boxed, host_random_params(boxed, seed=1)


def models():
    """name -> (boxed abstract params, params, inputs, apply fn(params, *inputs) -> array)."""
    rng = np.random.default_rng(0)
    out = {}

    fc = FluxConfig.preset("tiny")
    flux_in = random_inputs(fc, BATCH, GRID, L_TXT, rng)
    flux = Flux(fc)
    out["flux"] = (*init(flux, *flux_in), flux_in, lambda p, *a: flux.apply({"params": p}, *a))

    t5 = T5Encoder(T5Config.preset("tiny"))
    ids = rng.integers(0, 1000, (BATCH, 12)).astype(np.int32)
    out["t5"] = (*init(t5, ids), (ids,), lambda p, x: t5.apply({"params": p}, x))

    clip = CLIPTextEncoder(CLIPConfig.preset("tiny"))
    ids = rng.integers(0, 1000, (BATCH, 16)).astype(np.int32)
    out["clip"] = (*init(clip, ids), (ids,), lambda p, x: clip.apply({"params": p}, x)[1])

    vae = AutoEncoder(AutoEncoderConfig.preset("tiny"))
    z = rng.standard_normal((BATCH, 4, 4, 16)).astype(np.float32)
    out["vae"] = (*init(vae, jnp.zeros((1, 8, 8, 3))), (z,), lambda p, z: vae.apply({"params": p}, z, method="decode"))
    return out


def shard_shape(x) -> list[int]:
    return list(x.addressable_shards[0].data.shape)


def layouts(params) -> dict:
    """Global and per-device shapes of every Flux parameter, by path."""
    return {
        jax.tree_util.keystr(p, simple=True, separator="/"): {"shape": list(x.shape), "shard": shard_shape(x)}
        for p, x in jax.tree.flatten_with_path(params)[0]
    }


def heads_constraint(strategy, mesh) -> str:
    """The sharding constraint put on q in attention, as lowered text ('' if none)."""
    q = jnp.zeros((8, 4, 8, 2))
    with strategy.activate(mesh):
        text = jax.jit(lambda q: dot_product_attention(q, q, q)).lower(q).as_text()
    found = re.findall(r"sharding_constraint[^\n]*", text)
    return found[0] if found else ""


@pytest.fixture(scope="module")
def facts():
    """The single-device outputs' max |value|, and per (strategy, mesh) case the max abs error of each
    model against the single-device result and the live layouts of chosen parameters and outputs."""
    ms = models()
    reference = {}
    for name, (boxed, params, inputs, fn) in ms.items():
        reference[name] = np.asarray(jax.jit(fn)(params, *inputs))

    cases = []
    for strategy_name, ici, all_models in CASES:
        strategy = Strategy.load(strategy_name).with_ici(*ici)
        mesh = strategy.make_mesh()
        case = {"strategy": strategy_name, "ici": list(ici), "mesh": dict(mesh.shape),
                "data_size": strategy.data_size(mesh), "errors": {}, "outputs": {}}
        for name, (boxed, params, inputs, fn) in ms.items():
            if name != "flux" and not all_models:
                continue
            shardings = strategy.param_shardings(mesh)(boxed)
            sharded = jax.device_put(params, shardings)
            padded, n = strategy.put_batch(inputs, mesh)
            with strategy.activate(mesh):
                y = jax.jit(fn)(sharded, *padded)
            case["errors"][name] = float(np.abs(np.asarray(y)[:n] - reference[name]).max())
            case["outputs"][name] = {"shape": list(y.shape), "shard": shard_shape(y)}
            if name in ("flux", "t5"):
                case[f"{name}_params"] = layouts(sharded)
        case["heads_constraint"] = heads_constraint(strategy, mesh)
        cases.append(case)
    return {"reference_max_abs": {k: float(np.abs(v).max()) for k, v in reference.items()}, "cases": cases}

def _cases(facts, strategy):
    cases = [c for c in facts["cases"] if c["strategy"] == strategy]
    assert cases
    return cases


@pytest.mark.parametrize("strategy", SHIPPED)
def test_every_mesh_gives_the_single_device_result(facts, strategy):
    for model, scale in facts["reference_max_abs"].items():
        assert scale > 0.1, f"{model}: the reference output is too small to test anything"
    for case in _cases(facts, strategy):
        assert set(case["errors"]) >= {"flux"}
        for model, err in case["errors"].items():
            assert err <= FP32_ABS_TOL, f"{strategy} {case['ici']} {model}: max abs error {err}"


@pytest.mark.parametrize("strategy", SHIPPED)
def test_outputs_split_along_the_data_axes(facts, strategy):
    """Batch 3 is padded to the data size and each device holds its rows of the result."""
    for case in _cases(facts, strategy):
        data = case["data_size"]
        assert data == math.prod(case["mesh"][a] for a in Strategy.load(strategy).mesh_axes("activation_batch"))
        for model, out in case["outputs"].items():
            assert out["shape"][0] == -(-3 // data) * data, (model, out)
            assert out["shard"][0] == out["shape"][0] // data, (strategy, case["ici"], model, out)


def _param(case, model, path):
    return case[f"{model}_params"][path]


def test_dp_replicates_every_weight(facts):
    (case,) = _cases(facts, "dp")
    for model in ("flux", "t5"):
        for path, p in case[f"{model}_params"].items():
            assert p["shard"] == p["shape"], path


def test_fsdp_each_device_holds_an_eighth_of_every_kernel(facts):
    (case,) = _cases(facts, "fsdp")
    for model in ("flux", "t5"):
        kernels = {k: p for k, p in case[f"{model}_params"].items() if k.endswith(("kernel", "shared/embedding"))}
        assert len(kernels) >= 8
        for path, p in kernels.items():
            assert 8 * math.prod(p["shard"]) == math.prod(p["shape"]), (path, p)


def _tensor_split(case, model, path):
    """Which dims of a parameter are split, and by how much."""
    p = _param(case, model, path)
    return [s // d for s, d in zip(p["shape"], p["shard"])]


@pytest.mark.parametrize("model,column,row", [
    ("flux", "double_blocks/img_attn/qkv/kernel", "double_blocks/img_attn/proj/kernel"),
    ("flux", "double_blocks/img_mlp/0/kernel", "double_blocks/img_mlp/2/kernel"),
    ("flux", "single_blocks/linear1/kernel", "single_blocks/linear2/kernel"),
    ("t5", "block/layer_0/SelfAttention/q/kernel", "block/layer_0/SelfAttention/o/kernel"),
    ("t5", "block/layer_1/DenseReluDense/wi_0/kernel", "block/layer_1/DenseReluDense/wo/kernel"),
])
def test_tp_is_megatron(facts, model, column, row):
    """Column-parallel in (split output features), row-parallel out (split input features)."""
    for case in _cases(facts, "tp"):
        if f"{model}_params" not in case:
            continue
        t = case["mesh"]["tensor"]
        assert _tensor_split(case, model, column) == [1, 1, t], (case["ici"], column)
        assert _tensor_split(case, model, row) == [1, t, 1], (case["ici"], row)
    case = _cases(facts, "tp")[-1]
    assert _tensor_split(case, "flux", "img_in/kernel") == [1, 1]  # embedders stay whole


def test_fsdp_tp_splits_kernels_on_both_axes(facts):
    for case in _cases(facts, "fsdp_tp"):
        f, t = case["mesh"]["fsdp"], case["mesh"]["tensor"]
        assert _tensor_split(case, "flux", "double_blocks/img_attn/qkv/kernel") == [1, f, t]
        assert _tensor_split(case, "flux", "double_blocks/img_attn/proj/kernel") == [1, t, f]
        assert _tensor_split(case, "flux", "double_blocks/img_mod/lin/kernel") == [1, f, t]


@pytest.mark.parametrize("strategy", SHIPPED)
def test_attention_heads_constrained_as_the_table_says(facts, strategy):
    """q, k, v (B, L, H, d) carry the batch axes on B and the heads axis (tp) on H."""
    s = Strategy.load(strategy)
    batch = s.mesh_axes("activation_batch")[0]
    heads = s.mesh_axes("activation_heads")
    expected = f'[{{"{batch}"}}, {{}}, {{{chr(34) + heads[0] + chr(34) if heads else ""}}}, {{}}]'
    for case in _cases(facts, strategy):
        assert expected in case["heads_constraint"], case["heads_constraint"]
