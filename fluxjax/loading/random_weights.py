"""Random parameters of realistic scale, drawn from a model's abstract parameter tree.

For the `tiny` preset, the benchmarks and the sharding tests: nothing is initialised by the
model's `init` (compiling that takes longer than a tiny image). The rule is the one
`fluxjax.testing.reference.randomize_` applies to PyTorch modules, so trees are nonzero everywhere and a
misplaced shard or swapped half shows:
  matrices and kernels  N(0, 1/fan_in), fan_in = the input dims (not the stacked "layers" axis);
  norm scales           1 + N(0, 0.3^2);
  every other vector    N(0, 0.3^2).
With `neutral_vectors=True` scales are 1 and other vectors 0, as the models' own `init` sets
them (the tiny preset: a freshly initialised model, its outputs those of the kernels alone).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _is_box(x) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def _moments(path, leaf, neutral_vectors: bool) -> tuple[float, float]:
    """(mean, std) of the leaf at `path` (a boxed ShapeDtypeStruct, or a bare one: no layers axis)."""
    names = getattr(leaf, "names", None) or (None,) * len(nn.meta.unbox(leaf).shape)
    dims = [d for d, n in zip(nn.meta.unbox(leaf).shape, names) if n != "layers"]
    if len(dims) >= 2:
        return 0.0, 1.0 / float(np.sqrt(np.prod(dims[:-1])))
    mean = 1.0 if str(getattr(path[-1], "key", path[-1])) == "scale" else 0.0
    return mean, 0.0 if neutral_vectors else 0.3


def host_random_params(shapes: Any, seed: int = 0, neutral_vectors: bool = False) -> Any:
    """NumPy parameters (each leaf's dtype) for `shapes`, the tree `jax.eval_shape(model.init, ...)["params"]`
    gives (boxed or not); the same values on every machine for a seed. For small models."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        mean, std = _moments(path, leaf, neutral_vectors)
        bare = nn.meta.unbox(leaf)
        return (mean + std * rng.standard_normal(bare.shape, np.float32)).astype(bare.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes, is_leaf=_is_box)


@partial(jax.jit, static_argnums=(1, 2, 3, 4))  # one small program per distinct leaf
def _draw(key, shape, dtype, mean, std):
    return (mean + std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def device_random_params(shapes: Any, seed: int = 0, neutral_vectors: bool = False) -> Any:
    """The same rule drawn on the default device, leaf by leaf: full-size trees (24 GB) never pass
    through the host."""
    leaves = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=_is_box)[0]
    keys = iter(jax.random.split(jax.random.key(seed), len(leaves)))

    def draw(path, leaf):
        bare = nn.meta.unbox(leaf)
        return _draw(next(keys), tuple(bare.shape), jnp.dtype(bare.dtype), *_moments(path, leaf, neutral_vectors))

    return jax.tree_util.tree_map_with_path(draw, shapes, is_leaf=_is_box)
