"""AOT-compile one denoise step for a strategy's mesh on simulated CPU devices; print its memory.

Run by fluxjax/plan/planner.py as a child process with XLA_FLAGS=--xla_force_host_platform_device_count=N
already set: `python -m fluxjax.plan.xla '{"model": "dev", "strategy": "fsdp", ...}'`.
Nothing is allocated: parameters and inputs are ShapeDtypeStructs carrying their shardings.

The step is compiled in float32 (the CPU backend upcasts bf16 matmuls to float32, so a bf16
compile would count float32 copies an accelerator never makes), and with attention_impl "xla",
as on an accelerator: "auto" would trace a CPU's query-blocked attention ("xla_blocked"), and
the (B, H, L, L) logits an accelerator holds would be missing from the count.
"""

from __future__ import annotations

import json
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from fluxjax.config import FluxConfig
from fluxjax.loading import registry
from fluxjax.parallel.strategies import Strategy


def step_program(model: str, strategy: Strategy, mesh, batch: int, l_img: int, l_txt: int):
    """One denoise step, x <- x - 0.1 v(x), for the whole batch on `mesh`: (jitted step, its
    abstract arguments). float32 parameters laid out as the strategy lays them; inputs float32,
    batch-sharded. (The TPU compile, fluxjax/plan/tpu.py, compiles the pipeline's own programs.)
    """
    cfg = FluxConfig.preset(model)
    flux = registry.build("transformer", cfg, jnp.float32, attention_impl="xla")
    boxed = registry.abstract_params("transformer", flux)
    shardings = strategy.param_shardings(mesh)(boxed)
    params = jax.tree.map(lambda b, s: jax.ShapeDtypeStruct(b.value.shape, jnp.float32, sharding=s), boxed, shardings,
                          is_leaf=lambda x: isinstance(x, nn.Partitioned))

    def arg(*shape):
        return jax.ShapeDtypeStruct((batch, *shape), jnp.float32, sharding=strategy.batch_sharding(mesh, 1 + len(shape)))

    ids = cfg.id_columns  # RoPE's position columns: 3 in FLUX.1, 4 in FLUX.2
    inputs = (arg(l_img, cfg.in_channels), arg(l_img, ids), arg(l_txt, cfg.context_in_dim), arg(l_txt, ids), arg(),
              arg(cfg.vec_in_dim) if cfg.vec_in_dim else None, arg())  # FLUX.2 has no pooled vector

    def step(p, img, img_ids, txt, txt_ids, t, y, guidance):
        v = flux.apply({"params": p}, img, img_ids, txt, txt_ids, t, y, guidance if cfg.guidance_embed else None)
        return img - 0.1 * v

    return jax.jit(step, donate_argnums=1), (params, *inputs)


def step_memory(model: str, strategy: Strategy, batch: int, l_img: int, l_txt: int) -> dict:
    """Compile `step_program` in float32 with XLA attention on the strategy's mesh of this
    process's (simulated CPU) devices; report bytes per device."""
    mesh = strategy.make_mesh()
    # all logits at once (attention "xla", unblocked), as on an accelerator
    step, args = step_program(model, strategy, mesh, batch, l_img, l_txt)
    start = time.perf_counter()
    with strategy.activate(mesh):
        compiled = step.lower(*args).compile()
    stats = compiled.memory_analysis()
    return dict(temp_bytes=int(stats.temp_size_in_bytes), argument_bytes=int(stats.argument_size_in_bytes),
                compile_s=time.perf_counter() - start)


def main(argv: list[str]) -> None:
    spec = json.loads(argv[0])
    fields = spec["strategy"]  # the parent's Strategy, as dataclasses.asdict made it
    strategy = Strategy(fields["name"], fields["description"], tuple(fields["axes"]), tuple(fields["ici"]),
                        tuple(fields["dcn"]), tuple((logical, tuple(axes)) for logical, axes in fields["table"]),
                        fields["source"])
    print(json.dumps(step_memory(spec["model"], strategy, spec["batch"], spec["l_img"], spec["l_txt"])))


if __name__ == "__main__":
    main(sys.argv[1:])
