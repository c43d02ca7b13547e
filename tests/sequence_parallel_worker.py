"""Sequence-parallel strategies (Ulysses, ring) on 8 simulated CPU devices; prints JSON facts.

Run by tests/test_sequence_parallel.py in a subprocess (the device count is fixed when jax is
imported): `python tests/sequence_parallel_worker.py HUB_FOLDER`, HUB_FOLDER a hub-layout
fixture with an 8-head transformer. It prints, per case, the error of the transformer (relative
to the single-device output's max) and of the pipeline's pixels against one device, and the
collectives and array shapes of the compiled attention; the test decides what is right.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["FLUXJAX_COMPILATION_CACHE"] = "off"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from fluxjax.config import FluxConfig  # noqa: E402
from fluxjax.models.flux import Flux  # noqa: E402
from fluxjax.models.attention import attention  # noqa: E402
from fluxjax.pipeline.pipeline import FluxPipeline  # noqa: E402
from fluxjax.loading.random_weights import host_random_params  # noqa: E402
from fluxjax.parallel.strategies import Strategy  # noqa: E402
from transformer_inputs import random_inputs  # noqa: E402

HEADS = 8  # divisible by every degree tested, so Ulysses runs at 2, 4 and 8
L_TXT = 5
GRIDS = {"divides": (3, 9), "pads": (4, 6)}  # 5 + 27 = 32 tokens (divides 2, 4, 8); 5 + 24 = 29 (none)
BATCH = 4  # divides the fsdp axis of the 2D meshes
# (strategy, ici): the 1D ones on the first `seq` devices, the fsdp combinations on all 8.
CASES = [(f"sp_{m}", (1, n)) for m in ("ring", "ulysses") for n in (2, 4, 8)]
CASES += [(f"sp_{m}_fsdp", ici) for m in ("ring", "ulysses") for ici in ((4, 2), (2, 4))]
# The pipeline: 64x64 -> 16 image + 16 text tokens (divides); 48x80 -> 15 + 16 = 31 (pads).
SIZES = {"divides": dict(height=64, width=64), "pads": dict(height=48, width=80)}
# The sizes each pipeline case runs (compiles dominate the test's time): both at degree 8, one
# each at 2 and 4; the fsdp combinations a batch of 4 on 4 x 2 (padded tokens).
PIPELINE = {(1, 2): ("pads",), (1, 4): ("divides",), (1, 8): ("divides", "pads"), (4, 2): ("pads",)}
KW = dict(num_steps=2, guidance=3.5, max_sequence_length=16, output="np", seed=0)
PROMPTS = ["a photo of a cat", "a red fox in the snow", "a bowl of ramen", "a city at night"]


def mesh_of(strategy: Strategy, ici) -> tuple[Strategy, jax.sharding.Mesh]:
    strategy = strategy.with_ici(*ici)
    n = int(np.prod(ici))
    return strategy, strategy.make_mesh(jax.devices()[:n])


def transformer_inputs(cfg: FluxConfig, grid, rng) -> tuple:
    return random_inputs(cfg, BATCH, grid, L_TXT, rng)


def transformer_errors() -> list[dict]:
    cfg = dataclasses.replace(FluxConfig.preset("tiny"), hidden_size=16 * HEADS, num_heads=HEADS, axes_dim=(4, 6, 6))
    model = Flux(cfg)
    rng = np.random.default_rng(0)
    inputs = {name: transformer_inputs(cfg, grid, rng) for name, grid in GRIDS.items()}
    boxed = jax.eval_shape(model.init, jax.random.key(0), *inputs["pads"])["params"]
    params = host_random_params(boxed, seed=1)
    apply = lambda p, *a: model.apply({"params": p}, *a)  # noqa: E731
    reference = {name: np.asarray(jax.jit(apply)(params, *x)) for name, x in inputs.items()}
    # A fresh jit per case: jax.jit's cache does not see the rules, and sp_ring and sp_ulysses
    # differ only in them (the pipeline keys on them with sharding.jit_with_rules).
    out = []
    for name, ici in CASES:
        strategy, mesh = mesh_of(Strategy.load(name), ici)
        sharded = jax.device_put(params, strategy.param_shardings(mesh)(boxed))
        case = {"strategy": name, "mesh": dict(mesh.shape), "errors": {}}
        for tokens, x in inputs.items():
            with strategy.activate(mesh):
                y = np.asarray(jax.jit(lambda p, *a: apply(p, *a))(sharded, *x))
            case["errors"][tokens] = float(np.abs(y - reference[tokens]).max() / np.abs(reference[tokens]).max())
        out.append(case)
    return out


def compiled_attention(name: str, n: int, length: int) -> dict:
    """The attention of one block compiled under strategy `name` at degree n, inputs split over
    the tokens as the blocks leave them: the collectives and every array shape of its HLO."""
    strategy, mesh = mesh_of(Strategy.load(name), (1, n))
    b, h, d = 2, HEADS, 16
    rng = np.random.default_rng(0)
    split = NamedSharding(mesh, PartitionSpec(None, "seq"))
    q, k, v = (jax.device_put(rng.standard_normal((b, length, h, d)).astype(np.float32), split) for _ in range(3))
    cos, sin = (jax.device_put(rng.standard_normal((b, length, d // 2)).astype(np.float32), split) for _ in range(2))
    with strategy.activate(mesh):
        fn = jax.jit(lambda *a: attention(*a), out_shardings=NamedSharding(mesh, PartitionSpec(None, "seq")))
        text = fn.lower(q, k, v, cos, sin).compile().as_text()
    # ops, not instruction names: "%all-to-all.2 = ... all-to-all(...)"
    ops = re.findall(r" (all-to-all|all-gather|all-reduce|reduce-scatter|collective-permute)(?:-start)?\(", text)
    shapes = sorted({tuple(int(x) for x in s.split(",")) for s in re.findall(r"f32\[([\d,]+)\]", text)})
    return {"strategy": name, "degree": n, "length": length, "collectives": sorted(set(ops)),
            "count": len(ops), "shapes": shapes}


def splash_errors() -> list[dict]:
    """One attention call with "splash" (Pallas interpret mode here) under sp_ring at degrees 2 and
    4 and sp_ulysses at 2, its output and its gradients (q, k, v) against XLA's on one device; 29
    tokens (padded in the ring's blocks and in splash's)."""
    rng = np.random.default_rng(2)
    b, length, h, d = 2, 29, HEADS, 16
    q, k, v = (rng.standard_normal((b, length, h, d)).astype(np.float32) for _ in range(3))
    cos, sin = (rng.standard_normal((b, length, d // 2)).astype(np.float32) for _ in range(2))
    w = rng.standard_normal((b, length, h * d)).astype(np.float32)

    def run(impl):
        value = lambda q, k, v: attention(q, k, v, cos, sin, implementation=impl)  # noqa: E731
        grads = jax.grad(lambda q, k, v: (value(q, k, v) * w).sum(), argnums=(0, 1, 2))
        return [np.asarray(x) for x in (jax.jit(value)(q, k, v), *jax.jit(grads)(q, k, v))]

    reference = run("xla")
    out = []
    for name, degrees in (("sp_ring", (2, 4)), ("sp_ulysses", (2,))):  # interpret mode is slow: few cases
        for n in degrees:
            strategy, mesh = mesh_of(Strategy.load(name), (1, n))
            with strategy.activate(mesh):
                got = run("splash")
            errors = [float(np.abs(g - r).max() / np.abs(r).max()) for g, r in zip(got, reference)]
            out.append({"strategy": name, "degree": n, "errors": dict(zip(("out", "dq", "dk", "dv"), errors))})
    return out


def pipeline_errors(hub: str) -> list[dict]:
    single = FluxPipeline.from_pretrained(hub, dtype="float32")
    reference = {size: single(PROMPTS[:1], **kw, **KW) for size, kw in SIZES.items()}
    reference_batch = single(PROMPTS, **SIZES["pads"], **KW)
    out = []
    for name, ici in CASES:
        if ici not in PIPELINE:
            continue
        strategy, _ = mesh_of(Strategy.load(name), ici)
        pipe = FluxPipeline.from_pretrained(hub, dtype="float32", sharding=strategy,
                                            devices=jax.devices()[: int(np.prod(ici))])
        case = {"strategy": name, "mesh": dict(pipe.mesh.shape), "errors": {}}
        if name.endswith("_fsdp"):  # a batch of 4 over the fsdp axis; one padded size
            images = pipe(PROMPTS, **SIZES["pads"], **KW)
            case["errors"]["pads"] = float(np.abs(images - reference_batch).max())
        else:
            for size in PIPELINE[ici]:
                case["errors"][size] = float(np.abs(pipe(PROMPTS[:1], **SIZES[size], **KW) - reference[size]).max())
        out.append(case)
    return out


def main(hub: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    hlo = [compiled_attention(f"sp_{m}", n, 40) for m in ("ring", "ulysses") for n in (2, 8)]
    with jax.default_matmul_precision("highest"):
        splash = splash_errors()
    print(json.dumps({"devices": jax.device_count(), "transformer": transformer_errors(), "hlo": hlo,
                      "splash": splash, "pipeline": pipeline_errors(hub)}))


if __name__ == "__main__":
    main(sys.argv[1])
