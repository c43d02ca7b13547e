"""Live LoRA: the adapters' low-rank branch run inside the jitted loop, next to each adapted Linear.

`variables(params, adapters)` + `live(scales)` around `model.apply` add the branch
x @ a * (scales @ scale) @ b + scales @ bias (fluxjax/lora/adapters.py gives the leaves); the
adapters and `scales` (B, n), a strength per image and LoRA, are jit arguments, so new LoRAs of the
same ranks, or new strengths, do not recompile.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from fluxjax.lora.adapters import Adapters

COLLECTION = "lora"  # the variable collection the live branch reads; scanned with the blocks


def variables(params, adapters: Adapters | dict | None) -> dict:
    """The `model.apply` variables: params plus, when given, the adapters' tree as the lora collection."""
    if adapters is None:
        return {"params": params}
    tree = adapters.tree if isinstance(adapters, Adapters) else adapters
    return {"params": params, COLLECTION: tree}


def live(scales):
    """A context in which (while tracing `model.apply(variables(params, adapters), ...)`) every
    Linear with an adapter adds x @ a * (scales @ scale) @ b + scales @ bias.

    scales: (B, n) float32, the strength of LoRA k on image b (a jit argument: no recompile when
    it changes). A no-op for Linears without adapters. The branch is a closure over `scales`, made
    for this call (in the traced function), so the trace reads no module state.
    """
    scales = jnp.asarray(scales, jnp.float32)

    def low_rank_branch(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, nn.Dense) or not module.has_variable(COLLECTION, "a"):
            return out
        x = args[0]
        a, b, scale, bias = (module.get_variable(COLLECTION, k) for k in ("a", "b", "scale", "bias"))
        # x (B, ..., in): every Linear of FLUX sees the batch first, so per-image strengths broadcast.
        cols = (scales @ scale.astype(jnp.float32)).astype(x.dtype)       # (B, R)
        shape = (x.shape[0],) + (1,) * (x.ndim - 2)
        h = (x @ a.astype(x.dtype)) * cols.reshape(shape + cols.shape[-1:])
        shift = (scales @ bias.astype(jnp.float32)).astype(out.dtype)     # (B, out)
        return out + (h @ b.astype(x.dtype)).astype(out.dtype) + shift.reshape(shape + shift.shape[-1:])

    return nn.intercept_methods(low_rank_branch)
