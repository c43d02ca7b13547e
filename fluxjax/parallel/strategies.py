"""Sharding strategies: a device mesh plus a table from logical axes to mesh axes.

A strategy is a TOML file in fluxjax/configs/sharding/ (or anywhere, by path):

    description = "when to choose it, what it costs"
    [mesh]
    axes = ["fsdp", "tensor"]   # mesh axis names
    ici  = [-1, 2]              # devices per axis inside one slice (a TPU slice, or one host elsewhere)
    dcn  = [-1, 1]              # slices (hosts) per axis; -1 on one axis: "all the rest"
    [rules]                     # logical axis (fluxjax/models/axes.py) -> mesh axis, or a list of
    embed = "fsdp"              #   mesh axes to split one dim over all of them at once
    heads = "tensor"
    activation_batch = "fsdp"
    [fallback]                  # optional: a second choice, tried after every [rules] entry
    heads = "fsdp"

The global mesh shape is ici * dcn, axis by axis. Keys must be logical axes of
fluxjax/models/axes.py (anything else is an error naming the file and key); names not in the
file are replicated.

The file is one Flax rule list, read by Flax's own logical-to-mesh matching
(`nn.logical_to_mesh_axes`) for weights and activations alike: [rules] in file order, then
[fallback] in file order. Entries are taken in that order, each giving its mesh axes to the
array's dim of its name unless that dim has some already or another dim holds those axes; so a
[fallback] entry is a name's second choice (MaxText's "list a logical axis twice"), and the
order of [rules] says which of a kernel's dims gets a mesh axis first. For a parameter, the
entries whose mesh axes do not divide its dim are left out first (a 4-head table on an 8-way
axis): the dim then takes its fallback or is replicated, and `param_specs` returns a note
saying so, which `param_shardings` logs and `fluxjax plan` prints. Activations are matched
without that check (XLA pads uneven shards); the batch is never uneven, because the pipeline
pads batches with `pad_batch`.

Use (the pipeline and the loaders need nothing else):

    fluxjax.parallel.distributed.initialize()                       # first thing in a multi-host run
    strategy = Strategy.load("fsdp")                       # or a path to a .toml
    mesh = strategy.make_mesh()                            # all devices of all processes
    shardings = strategy.param_shardings(mesh)(abstract)   # abstract: boxed eval_shape params
    batch, n = strategy.put_batch(batch, mesh)             # padded to the data size, on the mesh
    with strategy.activate(mesh):                          # mesh + logical rules, so the models'
        out = jitted(params, *batch)                       # activation constraints apply
    images = out[:n]

`activate` is the one way the rules reach traced code. A function jitted once and called under
several strategies is wrapped with `jit_with_rules` (sampling.denoise, text.encode_prompts_jit,
the pipeline's decode), which keys its compile cache on the active rules as well: a strategy
compiles once per shape, and no strategy reuses a trace made under another.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.resources
import inspect
import logging
import math
import os
import tomllib
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from fluxjax.errors import UsageError
from fluxjax.models.axes import AXES

# Package data (pyproject.toml), so a wheel install has the strategies too.
STRATEGY_DIR = importlib.resources.files("fluxjax") / "configs" / "sharding"
BATCH_AXIS = "activation_batch"

log = logging.getLogger(__name__)

MeshAxes = tuple[str, ...]  # the mesh axes one logical axis maps to; () = replicated
RULE_TABLES = ("rules", "fallback")  # the file's tables of logical axis -> mesh axes, in precedence order


def available() -> list[str]:
    """Names of the strategies shipped in fluxjax/configs/sharding."""
    return sorted(p.name[: -len(".toml")] for p in STRATEGY_DIR.iterdir() if p.name.endswith(".toml"))


def _is_box(x) -> bool:
    return isinstance(x, nn.Partitioned)


@dataclasses.dataclass(frozen=True)
class Strategy:
    """One sharding strategy. Build with `Strategy.load`; see the module docstring for the file."""

    name: str
    description: str
    axes: tuple[str, ...]
    ici: tuple[int, ...]
    dcn: tuple[int, ...]
    # Flax's rule list: (logical axis, mesh axes) in precedence order, [rules] then [fallback];
    # a logical axis listed again is its second choice.
    table: tuple[tuple[str, MeshAxes], ...]
    source: str = ""  # the file it was read from, for error messages

    def __post_init__(self):
        where = self.source or f"sharding strategy {self.name!r}"
        if len(set(self.axes)) != len(self.axes) or not self.axes:
            raise UsageError(f"{where}: mesh.axes {list(self.axes)} must be distinct names, at least one")
        for key in ("ici", "dcn"):
            shape = getattr(self, key)
            if len(shape) != len(self.axes):
                raise UsageError(f"{where}: mesh.{key} {list(shape)} needs one entry per axis {list(self.axes)}")
            if sum(s == -1 for s in shape) > 1 or any(s < 1 and s != -1 for s in shape):
                raise UsageError(f"{where}: mesh.{key} {list(shape)}: positive sizes, at most one -1")
        for logical, mesh_axes in self.table:
            if logical not in AXES:
                raise UsageError(f"{where}: key {logical!r} is not a logical axis of fluxjax's models "
                                 f"(fluxjax/models/axes.py: {', '.join(AXES)})")
            unknown = [a for a in mesh_axes if a not in self.axes]
            if unknown:
                raise UsageError(f"{where}: rule {logical} -> {unknown}: no such mesh axis (axes: {list(self.axes)})")

    @classmethod
    def load(cls, name_or_path: str | os.PathLike) -> "Strategy":
        """A strategy by name (a file of fluxjax/configs/sharding) or by path to a .toml file."""
        path = Path(name_or_path)
        if path.suffix != ".toml":
            path = Path(str(STRATEGY_DIR / f"{name_or_path}.toml"))
        if not path.is_file():
            raise UsageError(f"unknown sharding strategy {os.fspath(name_or_path)!r}: not a file; known: {', '.join(available())}")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise UsageError(f"{path}: not valid TOML ({e})") from None
        unknown = set(data) - {"description", "mesh", *RULE_TABLES}
        if unknown or "mesh" not in data:
            raise UsageError(f"{path}: expected keys description, mesh, {', '.join(RULE_TABLES)}; got {sorted(data)}")
        mesh = data["mesh"]
        if set(mesh) != {"axes", "ici", "dcn"}:
            raise UsageError(f"{path}: [mesh] needs exactly axes, ici, dcn; got {sorted(mesh)}")
        table = []
        for section in RULE_TABLES:
            for logical, target in data.get(section, {}).items():
                if not (isinstance(target, str) or isinstance(target, list) and all(isinstance(a, str) for a in target)):
                    raise UsageError(f"{path}: [{section}] {logical} = {target!r}: expected a mesh axis or a list of them")
                # (an unknown name is left to __post_init__, which says it is unknown)
                if section == "fallback" and logical in AXES and logical not in data.get("rules", {}):
                    raise UsageError(f"{path}: [fallback] {logical}: a second choice needs a first one in [rules]")
                table.append((logical, (target,) if isinstance(target, str) else tuple(target)))
        return cls(path.stem, data.get("description", "").strip(), tuple(mesh["axes"]),
                   tuple(mesh["ici"]), tuple(mesh["dcn"]), tuple(table), str(path))

    def with_ici(self, *ici: int) -> "Strategy":
        """The same strategy on another per-slice mesh shape, e.g. with_ici(2, 4)."""
        return dataclasses.replace(self, ici=tuple(ici))

    @property
    def rules(self) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
        """The table as Flax logical axis rules, for `nn.logical_axis_rules(...)`."""
        return _flax_rules(self.table)

    def mesh_axes(self, logical: str) -> MeshAxes:
        """The mesh axes a logical axis maps to first ([rules]); () when it is replicated."""
        return next((axes for name, axes in self.table if name == logical), ())

    # -- mesh ------------------------------------------------------------------------------

    def factors(self, num_devices: int, num_slices: int = 1) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(ici, dcn) with the -1s resolved for this many devices in all and slices (hosts)."""
        if num_devices % num_slices:
            raise UsageError(f"{num_devices} devices do not split evenly over {num_slices} slices (hosts)")
        dcn = _resolve(self.dcn, num_slices, f"{self.name}: mesh.dcn", "slices (hosts)")
        ici = _resolve(self.ici, num_devices // num_slices, f"{self.name}: mesh.ici", "devices per slice")
        return ici, dcn

    def mesh_shape(self, num_devices: int, num_slices: int = 1) -> dict[str, int]:
        """{axis: size} of the global mesh (ici * dcn per axis), without touching any device."""
        ici, dcn = self.factors(num_devices, num_slices)
        return {a: i * d for a, i, d in zip(self.axes, ici, dcn)}

    def make_mesh(self, devices: Sequence[jax.Device] | None = None) -> Mesh:
        """The strategy's mesh over `devices` (default: every device of every process).

        Slices are TPU slices (devices carry `slice_index`) or, elsewhere, processes: the dcn
        factors lay mesh axes across them, the ici factors within them. Every process builds
        the same global mesh. Axes are `Auto`, so the models' sharding constraints apply.
        """
        devices = list(jax.devices() if devices is None else devices)
        tpu_slices = {getattr(d, "slice_index", None) for d in devices} - {None}
        if devices[0].platform == "tpu":
            # ICI spans a whole TPU slice, over all of its hosts: only slices are DCN granules. (The
            # devices of a one-slice topology description carry no slice_index at all.)
            slices = max(1, len(tpu_slices))
        else:
            slices = len(tpu_slices) if tpu_slices else len({d.process_index for d in devices})
        ici, dcn = self.factors(len(devices), slices)
        if slices == 1:
            grid = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
        else:
            grid = mesh_utils.create_hybrid_device_mesh(
                ici, dcn, devices, process_is_granule=not tpu_slices, allow_split_physical_axes=True
            )
        return Mesh(grid, self.axes, axis_types=(AxisType.Auto,) * len(self.axes))

    @contextlib.contextmanager
    def activate(self, mesh: Mesh) -> Iterator[Mesh]:
        """Context for tracing and running jitted code on `mesh`: sets the mesh and the rules."""
        with jax.set_mesh(mesh), nn.logical_axis_rules(self.rules):
            yield mesh

    # -- parameters ------------------------------------------------------------------------

    def spec(self, names: Sequence[str | None], shape: Sequence[int], mesh: Any) -> tuple[PartitionSpec, list[str]]:
        """PartitionSpec of an array with logical axis `names` and `shape` on `mesh`.

        mesh: a Mesh, or anything with its `.shape` mapping {axis: size} (the planner passes
        `SimpleNamespace(shape=strategy.mesh_shape(n))` to plan without devices).
        Flax's `nn.logical_to_mesh_axes` matches the names against the table, from which the
        entries whose mesh axes do not divide the dim of their name are left out first (see the
        module docstring). A name repeated in `names`, like (embed, embed), is matched at its
        first occurrence; the later dims stay whole (Flax refuses repeated names). The notes name
        each dim that would have taken mesh axes that do not divide it, and what it got instead.
        """
        names = tuple(None if name in names[:i] else name for i, name in enumerate(names))
        dims = {name: size for name, size in zip(names, shape) if name is not None}

        def fits(logical: str, axes: MeshAxes) -> bool:
            return logical not in dims or dims[logical] % _size(mesh, axes) == 0

        spec = nn.logical_to_mesh_axes(names, _flax_rules([(n, axes) for n, axes in self.table if fits(n, axes)]))
        # Matched without the divisibility check too, to name the dims the check changed.
        unchecked = nn.logical_to_mesh_axes(names, self.rules)
        notes = []
        for name, wanted, got in zip(names, unchecked, spec):
            if wanted is not None and not fits(name, _as_axes(wanted)):
                tried = ", ".join(f"{'x'.join(a)}={_size(mesh, a)}" for n, a in self.table if n == name and not fits(n, a))
                instead = "replicated" if got is None else f"on {'x'.join(_as_axes(got))} instead"
                notes.append(f"{name}={dims[name]} not divisible by {tried}: {instead}")
        return spec, notes

    def param_specs(self, abstract: Any, mesh: Any) -> tuple[Any, list[str]]:
        """(tree of PartitionSpec, notes) for a boxed param tree; notes as `spec` gives them, with the path.

        abstract: what `jax.eval_shape(model.init, ...)["params"]` returns (leaves
        nn.LogicallyPartitioned around ShapeDtypeStruct); unboxed leaves are replicated.
        """
        notes: list[str] = []

        def one(path, leaf):
            if not _is_box(leaf):
                return PartitionSpec()
            spec, why = self.spec(leaf.names, leaf.value.shape, mesh)
            notes.extend(f"{jax.tree_util.keystr(path, simple=True, separator='/')}: {w}" for w in why)
            return spec

        return jax.tree_util.tree_map_with_path(one, abstract, is_leaf=_is_box), notes

    def param_shardings(self, mesh: Mesh) -> Callable[[Any], Any]:
        """A callable: boxed abstract params -> matching tree of NamedSharding (unboxed structure).

        This is the `sharding=` argument of the loaders: weights are read straight into it.
        """

        def shardings(abstract):
            specs, notes = self.param_specs(abstract, mesh)
            for note in notes:
                log.info("sharding %s: %s", self.name, note)
            return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))

        return shardings

    # -- batches ---------------------------------------------------------------------------

    def data_size(self, mesh: Any) -> int:
        """How many ways the batch is split: batches are padded to a multiple of this."""
        return _size(mesh, self.mesh_axes(BATCH_AXIS))

    def batch_sharding(self, mesh: Mesh, ndim: int) -> NamedSharding:
        """Sharding of a (B, ...) input with `ndim` dims: B split along the data axes, rest replicated."""
        axes = self.mesh_axes(BATCH_AXIS)
        batch = None if not axes else axes[0] if len(axes) == 1 else axes
        return NamedSharding(mesh, PartitionSpec(batch, *([None] * (ndim - 1))))

    def put_batch(self, tree: Any, mesh: Mesh) -> tuple[Any, int]:
        """Pad a host batch (pytree of (B, ...) arrays) to the data size and place it on `mesh`.

        Every process passes the same global batch (all hosts read the same prompts and seeds);
        each keeps only the rows its devices hold, so this works on one host and on many.
        Returns (tree of global jax.Array, B); results are cut back with `out[:B]`.
        """
        tree, n = pad_batch(jax.tree.map(np.asarray, tree), self.data_size(mesh))

        def put(x):
            return jax.make_array_from_callback(x.shape, self.batch_sharding(mesh, x.ndim), lambda index: x[index])

        return jax.tree.map(put, tree), n


def placed(strategy: Strategy | None, mesh: Mesh | None, inputs: Any) -> tuple[Any, contextlib.AbstractContextManager]:
    """(inputs, context) for running a pipeline's jitted stages: host `inputs` (a pytree of (B, ...)
    arrays) padded to the strategy's data size and placed on `mesh` (`put_batch`), and the context
    that activates it; without a strategy, `inputs` as given and no context. Results are cut back
    to the B rows given."""
    if strategy is None:
        return inputs, contextlib.nullcontext()
    inputs, _ = strategy.put_batch(inputs, mesh)
    return inputs, strategy.activate(mesh)


def _active_rules() -> tuple:
    """The logical axis rules in force (`Strategy.activate`), hashable; () outside any strategy."""
    return tuple((logical, tuple(axes) if isinstance(axes, list) else axes) for logical, axes in nn.get_logical_axis_rules())


def jit_with_rules(fn: Callable | None = None, *, static_argnames: Sequence[str] = ()):
    """`jax.jit(fn, static_argnames=...)` whose compile cache is keyed on the active rules too.

    The rules reach traced code only through `Strategy.activate`, a Flax context that jax.jit
    does not see: a function jitted once and called under two strategies on the same mesh would
    otherwise reuse the first one's activation constraints. Each call reads the active rules and
    passes them as a hidden static argument, so a strategy compiles once and a new seed or
    prompt under it still reuses the executable. `fn` takes positional-or-keyword arguments
    only (they are bound by name, so `static_argnames` apply however they are passed).
    Use as `jit_with_rules(fn, static_argnames=...)` or as a decorator; the result has
    `.lower(...)` like a jitted function.
    """
    if fn is None:
        return functools.partial(jit_with_rules, static_argnames=static_argnames)
    return _RulesJit(fn, tuple(static_argnames))


class _RulesJit:
    """What `jit_with_rules` returns: calls and lowers `fn` jitted, with the active rules as a static argument."""

    def __init__(self, fn: Callable, static_argnames: tuple[str, ...]):
        self.signature = inspect.signature(fn)
        params = list(self.signature.parameters.values())
        if any(p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params):
            raise TypeError(f"jit_with_rules: {fn.__qualname__} may take positional-or-keyword arguments only")
        names = [p.name for p in params]

        def under_rules(rules, *args):
            with nn.logical_axis_rules(rules):
                return fn(*args)

        # Named as `fn`, so profiles and XLA dumps read jit(euler_loop), not jit(under_rules).
        under_rules.__name__, under_rules.__qualname__ = fn.__name__, fn.__qualname__
        self.static_argnums = (0, *(1 + names.index(n) for n in static_argnames))
        self.jitted = jax.jit(under_rules, static_argnums=self.static_argnums)
        functools.update_wrapper(self, fn)

    def _args(self, args, kwargs) -> tuple:
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return (_active_rules(), *bound.args)

    def __call__(self, *args, **kwargs):
        return self.jitted(*self._args(args, kwargs))

    def lower(self, *args, **kwargs):
        """As `jax.jit(...).lower`: the computation for these arguments under the active rules."""
        return self.jitted.lower(*self._args(args, kwargs))

    def compile(self, *args, **kwargs) -> Callable:
        """Compile for these arguments under the active rules, ahead of time; the result is called
        with the same arguments as the function (static ones included, defaults bound alike)."""
        compiled = self.lower(*args, **kwargs).compile()

        def call(*a, **k):
            return compiled(*(x for i, x in enumerate(self._args(a, k)) if i not in self.static_argnums))

        return call

    def _cache_size(self) -> int:
        """As `jax.jit(...)._cache_size()`: how many programs were compiled (tests count recompiles)."""
        return self.jitted._cache_size()


def _flax_rules(table: Sequence[tuple[str, MeshAxes]]) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """(logical, mesh axes) pairs -> Flax rules: one mesh axis as a name, several as a tuple, none as None."""
    return tuple((logical, axes[0] if len(axes) == 1 else (axes or None)) for logical, axes in table)


def _as_axes(entry: str | tuple[str, ...]) -> MeshAxes:
    """One entry of a PartitionSpec (a mesh axis or a tuple of them) as a tuple."""
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _size(mesh: Any, axes: MeshAxes) -> int:
    """Devices along `axes` of `mesh` (anything with a `.shape` mapping): the ways a dim is split."""
    return math.prod(mesh.shape[a] for a in axes)


def _resolve(shape: Sequence[int], total: int, where: str, what: str) -> tuple[int, ...]:
    """Replace the -1 of `shape` so that its product is `total`, or explain why it cannot be."""
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if total % known:
            raise UsageError(f"{where} {list(shape)}: {total} {what} are not a multiple of {known}")
        shape = tuple(total // known if s == -1 else s for s in shape)
    if math.prod(shape) != total:
        raise UsageError(f"{where} {list(shape)} needs {math.prod(shape)} {what}, there are {total}")
    return tuple(shape)


def pad_batch(tree: Any, multiple: int) -> tuple[Any, int]:
    """Pad every array of `tree` along axis 0 to a multiple of `multiple`; return (tree, n).

    The padding repeats the last row, so padded rows are valid inputs (token ids, noise) whose
    results are simply dropped: `out[:n]`. All leaves must share the leading size n.
    """
    sizes = {np.shape(x)[0] for x in jax.tree.leaves(tree)}
    if len(sizes) != 1:
        raise ValueError(f"pad_batch: arrays disagree on the batch size: {sorted(sizes)}")
    n = sizes.pop()
    pad = -n % multiple
    if not pad:
        return tree, n

    def one(x):
        xp = jnp if isinstance(x, jax.Array) else np
        return xp.concatenate([x, xp.repeat(x[-1:], pad, axis=0)], axis=0)

    return jax.tree.map(one, tree), n
