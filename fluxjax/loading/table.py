"""Key tables: the one mechanism that maps a PyTorch checkpoint onto a Flax parameter tree.

A table is a list of `Rule`s, written once per checkpoint layout (BFL single file, diffusers
folder, ...). A rule names one Flax leaf, the PyTorch key(s) that fill it and how to turn them
around. `iter_leaves` applies a table strictly: every key of the checkpoint is used, every leaf
of the model is filled, every shape is checked, and a violation raises `CheckpointError`
naming the file, the key and the shape that was expected.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
from flax import traverse_util
from flax.core import meta
from tqdm.auto import tqdm

from fluxjax.errors import CheckpointError
from fluxjax.loading.safetensors_io import TensorSource

LAYER = "{i}"  # stands for the block index in a source key; its rule fills a stacked leaf

# How a PyTorch tensor becomes a Flax leaf, and the inverse on shapes (to name the expected one).
TRANSFORMS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[tuple], tuple]]] = {
    "copy": (lambda w: w, lambda s: s),
    # nn.Linear weight [out, in] -> Dense kernel [in, out]
    "linear": (lambda w: w.T, lambda s: s[::-1]),
    # nn.Conv2d weight [O, I, kh, kw] -> Conv kernel [kh, kw, I, O]
    "conv": (lambda w: w.transpose(2, 3, 1, 0), lambda s: (s[3], s[2], s[0], s[1])),
    # a 1x1 Conv2d [O, I, 1, 1] used as a Dense kernel [I, O]
    "conv1x1": (lambda w: w[:, :, 0, 0].T, lambda s: (s[1], s[0], 1, 1)),
}


@dataclasses.dataclass(frozen=True)
class Rule:
    """One Flax leaf and the PyTorch tensor(s) that fill it.

    target:      "/"-joined Flax path, e.g. "double_blocks/img_attn/qkv/kernel".
    sources:     PyTorch keys, concatenated along PyTorch dim 0 (output rows) in this order.
                 A key holding "{i}" is expanded over `layers` blocks, and the target then has
                 a leading layers axis (nn.scan's stacked layout).
    transform:   a name in TRANSFORMS, applied after concatenation.
    rows:        the dim-0 size of each source when there are several (checks each one).
    layers:      how many blocks "{i}" runs over (0 = not stacked).
    swap_halves: exchange the two halves of dim 0 first (diffusers' norm_out order).
    """

    target: str
    sources: tuple[str, ...]
    transform: str = "copy"
    rows: tuple[int, ...] = ()
    layers: int = 0
    swap_halves: bool = False

    def __post_init__(self):
        if self.transform not in TRANSFORMS:
            raise ValueError(f"rule for {self.target}: unknown transform {self.transform!r}")
        stacked = [LAYER in s for s in self.sources]
        if any(stacked) != bool(self.layers) or (any(stacked) and not all(stacked)):
            raise ValueError(f"rule for {self.target}: '{{i}}' in sources and layers={self.layers} disagree")
        if len(self.sources) > 1 and len(self.rows) != len(self.sources):
            raise ValueError(f"rule for {self.target}: {len(self.sources)} sources need as many rows")

    def keys(self, layer: int | None = None) -> list[str]:
        if layer is None:
            return list(self.sources)
        return [s.replace(LAYER, str(layer)) for s in self.sources]

    def all_keys(self) -> list[str]:
        if not self.layers:
            return self.keys()
        return [k for i in range(self.layers) for k in self.keys(i)]


@dataclasses.dataclass(frozen=True)
class CheckpointTable:
    """One checkpoint as a layout module reads it: its model config, its tensors and its key table.

    strip_prefixes: key prefixes some redistributions add to every key (dropped if all keys have one).
    ignore: keys (without the prefix) checked and left unused on purpose: a tied twin, a constant buffer.
    """

    config: Any
    source: TensorSource
    rules: Sequence[Rule]
    strip_prefixes: Sequence[str] = ()
    ignore: frozenset = frozenset()


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything needed to fill one model's parameters from one checkpoint, checked or not yet read.

    kind:   "flux", "vae", "t5" or "clip" (the component an Orbax folder records).
    model:  the linen module in its stacked layout; shapes: its boxed abstract params.
    table:  the checkpoint (config, tensors, key table).
    """

    kind: str
    model: Any
    shapes: Mapping
    table: CheckpointTable

    @property
    def config(self):
        return self.table.config

    @property
    def source(self) -> TensorSource:
        return self.table.source

    def leaves(self, dtype=None, progress=None) -> Iterator[tuple[str, np.ndarray]]:
        """(Flax path, host array) one at a time (see `iter_leaves`)."""
        t = self.table
        return iter_leaves(t.source, t.rules, self.shapes, dtype, t.strip_prefixes, t.ignore, progress)

    def nbytes(self) -> int:
        """Bytes of every tensor the table reads (the prefix already resolved)."""
        t = self.table
        prefix = strip_prefix(t.source.keys(), t.strip_prefixes)
        return sum(t.source.nbytes(prefix + k) for k in table_keys(t.rules) if prefix + k in t.source)


def linear(target: str, source: str, layers: int = 0, bias: bool = True) -> list[Rule]:
    """The kernel and bias rules of one nn.Linear -> nn.Dense."""
    rules = [Rule(f"{target}/kernel", (f"{source}.weight",), "linear", layers=layers)]
    if bias:
        rules.append(Rule(f"{target}/bias", (f"{source}.bias",), "copy", layers=layers))
    return rules


def fused_linear(target: str, sources: Sequence[str], rows: Sequence[int], layers: int = 0,
                 bias: bool = True) -> list[Rule]:
    """One Dense filled from several nn.Linear whose output rows are concatenated."""
    rows = tuple(rows)
    rules = [Rule(f"{target}/kernel", tuple(f"{s}.weight" for s in sources), "linear", rows, layers)]
    if bias:
        rules.append(Rule(f"{target}/bias", tuple(f"{s}.bias" for s in sources), "copy", rows, layers))
    return rules


def table_keys(rules: Iterable[Rule]) -> list[str]:
    """Every PyTorch key a table reads, in table order."""
    return [k for r in rules for k in r.all_keys()]


def strip_prefix(keys: list[str], prefixes: Sequence[str]) -> str:
    """The first of `prefixes` that every key starts with, or ""."""
    for p in prefixes:
        if keys and all(k.startswith(p) for k in keys):
            return p
    return ""


FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # what a weight may be read as (fp8 and GGUF files read as F32)


def iter_leaves(
    source: TensorSource | str,
    rules: Sequence[Rule],
    shapes: Mapping,
    dtype=None,
    strip_prefixes: Sequence[str] = (),
    ignore: Iterable[str] = (),
    progress: Callable[[int], None] | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """(Flax path, host array) for every leaf of the table, one at a time.

    source:  a TensorSource (or a reader offering its methods: GGUFSource, Fp8Source) or a path to one.
    rules:   the layout's key table.
    shapes:  the model's parameter tree of `jax.ShapeDtypeStruct` (from `jax.eval_shape`).
    dtype:   the dtype of every leaf (None: each leaf's dtype in `shapes`).
    strip_prefixes, ignore: as CheckpointTable's; any other key the table does not read is an error.

    Every check (keys, shapes, dtypes) runs before the first tensor is read. A stacked leaf is
    filled block by block into one array of its final shape, never through a second copy.
    progress: called with the bytes of each tensor once it is read.
    """
    if isinstance(source, (str, os.PathLike)):  # else a TensorSource or a reader like it (gguf, fp8)
        source = TensorSource(source)
    flat_shapes = traverse_util.flatten_dict(meta.unbox(shapes), sep="/")
    prefix = check_source(source, rules, flat_shapes, strip_prefixes, ignore)
    # A bar on a terminal only (disable=None): tests and logs stay quiet. The converter has its own.
    name = os.path.basename(os.path.normpath(source.path))
    bar = tqdm(rules, desc=f"loading {name}", unit="param", disable=True if progress else None, leave=False)
    for rule in bar:
        leaf = flat_shapes[rule.target]
        arr = np.empty(leaf.shape, np.dtype(dtype if dtype is not None else leaf.dtype))
        for layer in range(rule.layers) if rule.layers else [None]:
            value = _read_rule(source, prefix, rule, layer)
            if rule.layers:
                arr[layer] = value
            else:
                arr[...] = value
            if progress:
                progress(sum(source.nbytes(prefix + k) for k in rule.keys(layer)))
            del value
        yield rule.target, arr
        del arr


def check_source(
    source: TensorSource,
    rules: Sequence[Rule],
    flat_shapes: Mapping,
    strip_prefixes: Sequence[str] = (),
    ignore: Iterable[str] = (),
) -> str:
    """Check a checkpoint against a table without reading a tensor; return the prefix to strip.

    Raises CheckpointError on an unexpected or missing key, a wrong shape or a non-float dtype,
    naming the file, the key and what was expected.
    """
    targets = [r.target for r in rules]
    if sorted(targets) != sorted(flat_shapes) or len(set(targets)) != len(targets):
        # A table that does not match its own model is a bug in fluxjax, not in the user's file.
        raise AssertionError(
            f"key table and model disagree: no rule for {sorted(set(flat_shapes) - set(targets))}, "
            f"no parameter for {sorted(set(targets) - set(flat_shapes))}"
        )

    file_keys = source.keys()
    prefix = strip_prefix(file_keys, strip_prefixes)
    expected = table_keys(rules)
    unexpected = sorted(set(k[len(prefix):] for k in file_keys) - set(expected) - set(ignore))
    missing = [k for k in expected if prefix + k not in source]
    if unexpected:
        raise CheckpointError(
            f"{source.path}: {len(unexpected)} key(s) this model does not have, e.g. {unexpected[:5]}; "
            "is it a checkpoint of another model or config?"
        )
    if missing:
        rule = next(r for r in rules if missing[0] in r.all_keys())
        raise CheckpointError(
            f"{source.path}: {len(missing)} key(s) missing, e.g. {missing[:5]} "
            f"(for parameter {rule.target}, shape {flat_shapes[rule.target].shape})"
        )

    # Every shape is checked before the first tensor is read: a wrong file fails at once.
    for key, want, target in _key_targets(rules, flat_shapes):
        got = source.shape(prefix + key)
        if got != want:
            raise CheckpointError(
                f"{source.where(prefix + key)}: tensor {prefix + key!r} has shape {list(got)}, "
                f"expected {list(want)} (for parameter {target})"
            )
        stored = source.dtype(prefix + key)
        if stored not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{source.where(prefix + key)}: tensor {prefix + key!r} has dtype {stored}, "
                f"expected one of {', '.join(FLOAT_DTYPES)} (for parameter {target})"
            )
    return prefix


def source_shapes(rule: Rule, leaf_shape: tuple) -> list[tuple[int, ...]]:
    """The PyTorch shape each of `rule.sources` must have to fill a leaf of `leaf_shape`."""
    block_shape = tuple(leaf_shape[1:] if rule.layers else leaf_shape)
    torch_shape = tuple(TRANSFORMS[rule.transform][1](block_shape))
    rows = rule.rows or (torch_shape[0],)
    if sum(rows) != torch_shape[0]:
        raise AssertionError(f"rule for {rule.target}: rows {rows} do not add up to {torch_shape[0]}")
    return [(n,) + torch_shape[1:] for n in rows]


def _key_targets(rules: Sequence[Rule], flat_shapes: Mapping) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """(PyTorch key, the shape it must have, the Flax leaf it fills) for every key of a table."""
    for rule in rules:
        wanted = source_shapes(rule, flat_shapes[rule.target].shape)
        for layer in range(rule.layers) if rule.layers else [None]:
            for key, shape in zip(rule.keys(layer), wanted):
                yield key, shape, rule.target


def key_shapes(rules: Sequence[Rule], shapes: Mapping) -> dict[str, tuple[int, ...]]:
    """Every PyTorch key of a table with the shape it must have, for a model's `shapes` tree."""
    flat = traverse_util.flatten_dict(meta.unbox(shapes), sep="/")
    return {key: shape for key, shape, _ in _key_targets(rules, flat)}


def _read_rule(source: TensorSource, prefix: str, rule: Rule, layer) -> np.ndarray:
    parts = [source.read(prefix + key) for key in rule.keys(layer)]
    value = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    if rule.swap_halves:
        half = value.shape[0] // 2
        value = np.concatenate([value[half:], value[:half]], axis=0)
    return TRANSFORMS[rule.transform][0](value)
