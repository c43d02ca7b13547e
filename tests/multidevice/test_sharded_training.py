"""Training on 8 simulated CPU devices: the tiny transformer trained 3 steps under each shipped
strategy equals training on one device, and the optimizer state and EMA are laid out like their
parameters."""

import jax
import numpy as np
import pytest

from fluxjax.config import FluxConfig
from fluxjax.loading.random_weights import host_random_params
from fluxjax.models.flux import Flux, param_shapes
from fluxjax.parallel.strategies import Strategy
from fluxjax.sampling.sampler import Schedule
from fluxjax.training.trainer import Trainer, TrainConfig
from test_train import tiny_batch

pytestmark = pytest.mark.slow  # minutes of compiles on a loaded CPU: outside the fast tier

SHARD_TOL = 1e-5  # max abs parameter error after 3 steps against one device: what the issue asks
CASES = [("dp", (8,)), ("fsdp", (8,)), ("tp", (1, 8)), ("fsdp_tp", (4, 2))]
STEPS, BATCH = 3, 8
CONFIG = TrainConfig(learning_rate=1e-3, warmup_steps=1, total_steps=10, compute_dtype="float32", ema_decay=0.5)


def path_str(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def layout(tree) -> dict:
    return {path_str(p): {"shape": list(x.shape), "shard": list(x.addressable_shards[0].data.shape)}
            for p, x in jax.tree.flatten_with_path(tree)[0]}


def adam_moments(opt_state):
    """The (mu, nu) parameter trees of the AdamW state inside the default optimizer's chain."""
    for part in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "mu") and hasattr(x, "nu")):
        if hasattr(part, "mu"):
            return part.mu, part.nu
    raise AssertionError("no Adam state found")


@pytest.fixture(scope="module")
def sharded_training():
    """Parameter errors against one device after STEPS steps, live layouts of parameters, Adam's
    moments and the EMA, per strategy."""
    cfg = FluxConfig.preset("tiny")
    model = Flux(cfg)
    params = host_random_params(param_shapes(model), seed=0, neutral_vectors=True)
    batch = tiny_batch(cfg, BATCH)

    def run(strategy=None, mesh=None):
        trainer = Trainer(model, CONFIG, Schedule.dev(), strategy=strategy, mesh=mesh)
        state = trainer.init(params, seed=1)
        for _ in range(STEPS):
            state, _ = trainer.step(state, batch)
        return state

    reference = run()
    ref_params = jax.tree.map(np.asarray, reference.params)
    moved = max(float(np.abs(a - np.asarray(b)).max()) for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(params)))
    cases = []
    for name, ici in CASES:
        strategy = Strategy.load(name).with_ici(*ici)
        mesh = strategy.make_mesh()
        state = run(strategy, mesh)
        err = max(float(np.abs(np.asarray(a) - b).max()) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_params)))
        ema_err = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                      for a, b in zip(jax.tree.leaves(state.ema), jax.tree.leaves(reference.ema)))
        mu, nu = adam_moments(state.opt_state)
        cases.append({"strategy": name, "ici": list(ici), "mesh": dict(mesh.shape), "error": err, "ema_error": ema_err,
                      "params": layout(state.params), "mu": layout(mu), "nu": layout(nu), "ema": layout(state.ema)})
    return {"params_moved": moved, "cases": cases}


def test_every_strategy_trains_to_the_single_device_parameters(sharded_training):
    assert sharded_training["params_moved"] > 100 * SHARD_TOL  # the 3 steps changed the weights
    assert {c["strategy"] for c in sharded_training["cases"]} == {"dp", "fsdp", "tp", "fsdp_tp"}
    for case in sharded_training["cases"]:
        assert case["error"] <= SHARD_TOL and case["ema_error"] <= SHARD_TOL, case["strategy"]


def test_optimizer_state_and_ema_are_laid_out_like_their_parameters(sharded_training):
    """Adam's moments and the EMA follow the strategy's table: under fsdp each device holds 1/8
    of every kernel's weights, moments and EMA; under dp all of them; under tp and fsdp_tp the
    qkv kernel is split as its weight is."""
    for case in sharded_training["cases"]:
        params = case["params"]
        for tree in ("mu", "nu", "ema"):
            assert case[tree] == params, (case["strategy"], tree)
        kernels = {k: p for k, p in params.items() if k.endswith("kernel")}
        assert len(kernels) >= 10
        split = lambda p: [s // d for s, d in zip(p["shape"], p["shard"])]  # noqa: E731
        if case["strategy"] == "dp":
            assert all(p["shard"] == p["shape"] for p in params.values())
        if case["strategy"] == "fsdp":
            for path, p in kernels.items():
                assert 8 * np.prod(p["shard"]) == np.prod(p["shape"]), path
        if case["strategy"] == "tp":
            assert split(params["double_blocks/img_attn/qkv/kernel"]) == [1, 1, 8]
        if case["strategy"] == "fsdp_tp":
            assert split(params["double_blocks/img_attn/qkv/kernel"]) == [1, 4, 2]
