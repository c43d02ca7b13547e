"""Train the tiny transformer 3 steps on one device and under each shipped strategy on 8 simulated
CPU devices; print JSON facts (parameter errors against one device, live layouts of parameters
and optimizer moments). Run by tests/test_train.py in a subprocess, since the device count must
be set before jax is imported. The test decides what is right.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import jax  # noqa: E402
import numpy as np  # noqa: E402

from fluxjax.config import FluxConfig  # noqa: E402
from fluxjax.models.flux import param_shapes  # noqa: E402
from fluxjax.models.flux import Flux  # noqa: E402
from fluxjax.loading.random_weights import host_random_params  # noqa: E402
from fluxjax.sampling.sampler import Schedule  # noqa: E402
from fluxjax.parallel.strategies import Strategy  # noqa: E402
from fluxjax.training.trainer import Trainer, TrainConfig  # noqa: E402

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


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    from test_train import tiny_batch

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
    print(json.dumps({"params_moved": moved, "cases": cases}))


if __name__ == "__main__":
    main()
