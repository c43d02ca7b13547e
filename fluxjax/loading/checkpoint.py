"""Orbax checkpoints of one model component, restored straight into the target shardings.

A component folder (what `fluxjax convert` writes for the transformer, the VAE, T5 or CLIP):

    COMPONENT/
      fluxjax.json   {"format": FORMAT, "model": "flux"|"vae"|"t5"|"clip", "config": {...}, "dtype": "bfloat16"}
                     and "quantize": "int8"|"fp8" when its Linears are stored quantized (`fluxjax convert
                     --quantize`: values + kernel_scale leaves, fluxjax/models/quantize.py)
      params/        an Orbax checkpoint of the parameter tree (stacked blocks, Flax paths)
      config.json    the source's config, when it had one (for people and other tools)

Parameters are written leaf group by leaf group (Orbax partial saves), so a writer holds one
group at a time, never the whole model. Restoring takes the abstract tree `jax.eval_shape`
gives and a sharding per leaf: each device reads only its own shard, nothing is initialised.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import sys
from typing import Any, Callable, Mapping

import jax
import numpy as np
from flax import traverse_util
from flax.core import meta

FORMAT = "fluxjax.orbax.v1"
MARKER = "fluxjax.json"
PARAMS = "params"
# Leaves are gathered into groups of about this many bytes per Orbax save: few saves (each has a
# fixed cost), while the host holds at most one group besides the leaf being filled.
GROUP_BYTES = 64 << 20

# A callable from the boxed abstract parameter tree (leaves nn.LogicallyPartitioned around
# ShapeDtypeStruct) to a matching tree of jax.sharding.Sharding.
ShardingFn = Callable[[Any], Any]


def _orbax():
    import orbax.checkpoint.experimental.v1 as ocp  # slow to import: only when a checkpoint is touched

    return ocp


def flat(tree: Mapping) -> dict[str, Any]:
    """A parameter tree (boxed or not) as {"a/b/kernel": leaf}."""
    return traverse_util.flatten_dict(meta.unbox(tree), sep="/")


def leaf_shardings(shapes: Mapping, sharding: ShardingFn | None) -> dict[str, jax.sharding.Sharding]:
    """{flat path: Sharding} for every leaf of `shapes` (the boxed abstract tree).

    sharding: the caller's callable (see ShardingFn); None puts every leaf whole on this
    process's first device (as `jax.device_put` does: under jax.distributed, jax.devices()[0]
    belongs to process 0).
    """
    paths = flat(shapes)
    if sharding is None:
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return {p: one for p in paths}
    given = flat(sharding(shapes))
    if set(given) != set(paths):
        raise ValueError(
            f"sharding callable returned shardings for {sorted(set(given) ^ set(paths))[:5]} "
            "which do not match the model's parameters"
        )
    for p, s in given.items():
        if not isinstance(s, jax.sharding.Sharding):
            raise ValueError(f"sharding callable returned {type(s).__name__} for {p}, expected a jax.sharding.Sharding")
    return given


def device_bytes(shapes: Mapping, sharding: ShardingFn | None) -> int:
    """Bytes of the parameters `shapes` (the boxed abstract tree) that one device holds when they are
    placed by `sharding` (as `leaf_shardings` reads it): each leaf's shard on the most loaded device."""
    shardings = leaf_shardings(shapes, sharding)
    total = 0
    for path, leaf in flat(shapes).items():
        shard = shardings[path].shard_shape(leaf.shape)
        total += int(np.prod(shard, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def place(value: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A host array as a jax.Array laid out by `sharding`: each device is sent only its slice."""
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def write_marker(folder: str, model: str, config: Any, dtype, quantize: str | None = None) -> None:
    """Write the component's fluxjax.json: which model, its config dataclass, its dtype, and the
    quantization its Linears are stored in (None: not quantized; the key is then left out)."""
    import dataclasses

    record = {"format": FORMAT, "model": model, "config": dataclasses.asdict(config), "dtype": np.dtype(dtype).name}
    if quantize is not None:
        record["quantize"] = quantize
    with open(os.path.join(folder, MARKER), "w") as f:
        json.dump(record, f, indent=1)


def is_component(path: str | os.PathLike) -> bool:
    """Whether `path` is a component folder written by `fluxjax convert`."""
    return os.path.isfile(os.path.join(os.fspath(path), MARKER))


def read_marker(path: str | os.PathLike, model: str) -> dict:
    """The fluxjax.json of a component folder, checked to be a `model` component.

    Returns {"format", "model", "config" (a dict of the config dataclass's fields), "dtype"} and
    "quantize" when the folder holds quantized Linears.
    """
    file = os.path.join(os.fspath(path), MARKER)
    try:
        with open(file) as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: unreadable ({e})") from None
    if record.get("format") != FORMAT:
        raise ValueError(f"{file}: format {record.get('format')!r}, expected {FORMAT!r}")
    if record.get("model") != model:
        raise ValueError(f"{file}: holds a {record.get('model')!r} component, expected {model!r}")
    if not os.path.isdir(os.path.join(os.fspath(path), PARAMS)):
        raise ValueError(f"{path}: no {PARAMS}/ folder beside {MARKER}")
    return record


class ParamsWriter:
    """Writes a parameter tree into an Orbax checkpoint one leaf at a time.

    `add(path, value)` takes a flat path ("double_blocks/img_attn/qkv/kernel") and a host array;
    leaves are saved in groups of about GROUP_BYTES and released. `close()` commits the
    checkpoint at `folder`; until then only `folder`.partial_save exists.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = os.path.abspath(os.fspath(folder))  # Orbax refuses relative paths (see restore_params)
        self._group: dict[str, np.ndarray] = {}
        self._bytes = 0

    def add(self, path: str, value: np.ndarray) -> None:
        self._group[path] = value
        self._bytes += value.nbytes
        if self._bytes >= GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._group:
            context = _orbax().Context()
            # The save completes before the group is released, so Orbax need not copy it first.
            context.memory.deepcopy_host_arrays = False
            with context:
                _orbax().partial.save(self.folder, traverse_util.unflatten_dict(self._group, sep="/"))
        self._group, self._bytes = {}, 0
        _release_freed_memory()

    def close(self) -> None:
        self._flush()
        _orbax().partial.finalize(self.folder)


def _release_freed_memory() -> None:
    """Hand memory freed by TensorStore's writer threads back to the OS.

    glibc keeps what those threads free in per-thread arenas; without a trim the process keeps
    growing by a few groups' worth between saves. A no-op where glibc is absent.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def save_params(folder: str | os.PathLike, params: Mapping) -> None:
    """Save a parameter tree already in memory (jax or NumPy leaves) as an Orbax checkpoint."""
    writer = ParamsWriter(folder)
    for path, value in flat(params).items():
        writer.add(path, np.asarray(value))
    writer.close()


def restore_params(
    folder: str | os.PathLike,
    shapes: Mapping,
    dtype=None,
    sharding: ShardingFn | None = None,
) -> dict:
    """Restore an Orbax parameter checkpoint straight into its shardings.

    folder:   the checkpoint (a component's params/ folder).
    shapes:   the model's abstract tree from `jax.eval_shape(model.init, ...)["params"]` (boxed or not).
    dtype:    the dtype of every leaf (None: each leaf's dtype in `shapes`); the stored one is cast.
    sharding: a ShardingFn; each device reads only its own shard. None: one device.
    Returns the nested dict of jax.Arrays, structure and shapes of `shapes`.
    """
    # Orbax's PyTree handler wants an absolute path; its metadata() turns the refusal of a
    # relative one into a logged warning and a None tree, so a relative path must never reach it.
    folder = os.path.abspath(os.fspath(folder))
    shardings = leaf_shardings(shapes, sharding)
    abstract = {
        p: jax.ShapeDtypeStruct(s.shape, np.dtype(dtype if dtype is not None else s.dtype), sharding=shardings[p])
        for p, s in flat(shapes).items()
    }
    ocp = _orbax()
    try:
        stored = ocp.metadata(folder).metadata
    except Exception as e:  # TensorStore/Orbax raise many types for a damaged or foreign folder
        raise ValueError(f"{folder}: not a readable Orbax checkpoint ({_reason(e)})") from None
    if not isinstance(stored, Mapping):
        raise ValueError(f"{folder}: not a readable Orbax checkpoint (no parameter tree in its metadata)")
    stored = flat(stored)
    if set(stored) != set(abstract):
        raise ValueError(
            f"{folder}: parameters {sorted(set(stored) - set(abstract))[:5]} are not in the model and "
            f"{sorted(set(abstract) - set(stored))[:5]} are missing from the checkpoint"
        )
    for p, want in abstract.items():
        if tuple(stored[p].shape) != want.shape:
            raise ValueError(f"{folder}: parameter {p} has shape {list(stored[p].shape)}, expected {list(want.shape)}")
    with _quiet_abandoned_coroutines():
        try:
            return ocp.load(folder, traverse_util.unflatten_dict(abstract, sep="/"))
        except Exception as e:
            raise _unreadable_param(folder, abstract, e) from None


def _unreadable_param(folder: str, abstract: dict[str, jax.ShapeDtypeStruct], error: Exception) -> Exception:
    """The error to raise when restoring `folder` failed with `error`: the first parameter that
    cannot be read on its own, named in one line; `error` itself when every one can (the failure
    was not the data's, e.g. out of memory)."""
    ocp = _orbax()
    context = ocp.Context()
    context.pytree.loading.partial_load = True  # one leaf of the tree at a time
    for p, leaf in abstract.items():
        try:
            with context:
                jax.block_until_ready(ocp.load(folder, traverse_util.unflatten_dict({p: leaf}, sep="/")))
        except Exception as e:
            return ValueError(f"{folder}: parameter {p} cannot be read ({_reason(e)}); the checkpoint is damaged "
                              "or incomplete: convert it again")
    return error


@contextlib.contextmanager
def _quiet_abandoned_coroutines():
    """When a read fails, Orbax leaves its other reads' coroutines unawaited, and Python prints
    each one's traceback (dozens of lines of TensorStore spec) when it is collected. The failure
    itself is raised, in one line; those echoes are dropped: collected here, under a silent hook."""
    hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        yield
    finally:
        gc.collect()
        sys.unraisablehook = hook


def _reason(error: BaseException) -> str:
    """The innermost cause of an Orbax/TensorStore error, in one line of at most 300 characters
    (the outer ones repeat a TensorStore spec of dozens of lines)."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return " ".join(str(error).split())[:300] or type(error).__name__

