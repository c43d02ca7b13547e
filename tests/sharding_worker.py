"""Run the tiny models under every shipped strategy on 8 simulated CPU devices; print JSON facts.

Run by tests/test_sharding.py in a subprocess, since the device count must be set before jax
is imported: `python tests/sharding_worker.py` (it sets XLA_FLAGS itself). Prints one JSON
object: the single-device outputs' max |value|, and per (strategy, mesh) case the max abs error of each model against the single-device
result and the live layouts of chosen parameters and outputs. The test decides what is right.
"""

from __future__ import annotations

import json
import os
import re
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fluxjax.config import AutoEncoderConfig, CLIPConfig, FluxConfig, T5Config  # noqa: E402
from fluxjax.models.autoencoder import AutoEncoder  # noqa: E402
from fluxjax.models.clip import CLIPTextEncoder  # noqa: E402
from fluxjax.models.flux import Flux  # noqa: E402
from fluxjax.models.attention import dot_product_attention  # noqa: E402
from fluxjax.models.t5 import T5Encoder  # noqa: E402
from fluxjax.loading.random_weights import host_random_params  # noqa: E402
from fluxjax.parallel.strategies import Strategy  # noqa: E402
from transformer_inputs import random_inputs  # noqa: E402

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


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
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
    print(json.dumps({"reference_max_abs": {k: float(np.abs(v).max()) for k, v in reference.items()}, "cases": cases}))


if __name__ == "__main__":
    main()
