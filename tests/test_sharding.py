"""Sharding strategies: the files and the API (on 8 simulated devices: tests/multidevice/test_sharded_models.py)."""

import dataclasses
import re
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fluxjax.config import AutoEncoderConfig, CLIPConfig, FluxConfig, T5Config
from fluxjax.errors import UsageError
from fluxjax.models.autoencoder import AutoEncoder
from fluxjax.models.axes import ACTIVATION_AXES, AXES, PARAMETER_AXES
from fluxjax.models.clip import CLIPTextEncoder
from fluxjax.models.flux import Flux, param_shapes
from fluxjax.models.t5 import T5Encoder
from fluxjax.parallel.strategies import Strategy, available, jit_with_rules, pad_batch

SHIPPED = ("dp", "fsdp", "tp", "fsdp_tp")


# -- files and API, no devices needed -----------------------------------------------------------


def test_shipped_strategies_load_with_a_description():
    assert set(SHIPPED) <= set(available())
    for name in SHIPPED:
        s = Strategy.load(name)
        assert len(s.description.split()) > 40, f"{name}: the paragraph on when to choose it is missing"
        assert s.mesh_axes("activation_batch"), f"{name}: the batch must be split"


def test_unknown_strategy_names_the_known_ones():
    # Every shipped name, in order (the sp_* strategies sit between fsdp_tp and tp).
    with pytest.raises(UsageError, match="unknown sharding strategy 'nope'.*dp, fsdp, fsdp_tp, sp_ring, .*, tp") as e:
        Strategy.load("nope")
    assert str(e.value).endswith("known: " + ", ".join(available()))


def test_strategy_by_path_and_bad_file(tmp_path):
    good = tmp_path / "mine.toml"
    good.write_text('[mesh]\naxes = ["x"]\nici = [-1]\ndcn = [-1]\n[rules]\nactivation_batch = "x"\n')
    assert Strategy.load(good).mesh_shape(4) == {"x": 4}
    bad = tmp_path / "bad.toml"
    bad.write_text('[mesh]\naxes = ["x"]\nici = [-1]\ndcn = [-1]\n[rules]\nembed = "y"\n')
    with pytest.raises(UsageError, match="no such mesh axis"):
        Strategy.load(bad)


def test_mesh_shape_resolves_the_rest_and_rejects_bad_counts():
    s = Strategy.load("fsdp_tp")
    assert s.mesh_shape(8) == {"fsdp": 4, "tensor": 2}
    assert s.mesh_shape(16, num_slices=2) == {"fsdp": 8, "tensor": 2}  # dcn -1 takes the hosts
    assert s.with_ici(2, 4).mesh_shape(8) == {"fsdp": 2, "tensor": 4}
    with pytest.raises(UsageError, match="not a multiple of 2"):
        s.mesh_shape(3)
    with pytest.raises(UsageError, match="needs 8"):
        s.with_ici(4, 2).mesh_shape(4)


def test_repeated_and_indivisible_dims():
    mesh = types.SimpleNamespace(shape={"fsdp": 8})
    s = Strategy.load("fsdp")
    spec, notes = s.spec(("embed", "embed"), (64, 64), mesh)  # MLPEmbedder.out_layer
    assert tuple(spec) == ("fsdp", None) and not notes
    spec, notes = s.spec(("embed", "qkv"), (12, 24), mesh)  # embed 12 does not split 8 ways: qkv does
    assert tuple(spec) == (None, "fsdp") and "embed=12" in notes[0]
    spec, notes = s.spec((None, "heads"), (32, 4), mesh)  # T5's bucket table with 4 heads
    assert tuple(spec) == (None, None) and "replicated" in notes[0]


def test_pad_batch_repeats_the_last_row():
    x, ids = np.arange(6.0).reshape(3, 2), np.array([[1], [2], [3]])
    (xp, idp), n = pad_batch((x, ids), 4)
    assert n == 3 and xp.shape == (4, 2) and (xp[3] == x[2]).all() and (idp[:, 0] == [1, 2, 3, 3]).all()
    assert pad_batch(x, 3)[0] is x
    with pytest.raises(ValueError, match="disagree"):
        pad_batch((x, np.zeros((2, 1))), 4)


def test_full_size_dev_fsdp_shards_every_kernel_eight_ways():
    """From abstract shapes only: under fsdp on 8 devices every dev kernel is split 8 ways."""
    abstract = param_shapes(Flux(FluxConfig.preset("dev")))
    specs, notes = Strategy.load("fsdp").param_specs(abstract, types.SimpleNamespace(shape={"fsdp": 8}))
    assert not notes
    leaves = jax.tree_util.tree_leaves_with_path(abstract, is_leaf=lambda x: hasattr(x, "names"))
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    for (path, box), spec in zip(leaves, flat_specs):
        if box.value.ndim >= 2 and "kernel" in str(path[-1]):
            assert "fsdp" in tuple(spec), f"{jax.tree_util.keystr(path)} {box.names} not sharded"


def _write_strategy(path, rules: str, fallback: str = ""):
    path.write_text('[mesh]\naxes = ["fsdp", "tensor"]\nici = [2, -1]\ndcn = [1, -1]\n'
                    f"[rules]\n{rules}\n" + (f"[fallback]\n{fallback}\n" if fallback else ""))
    return path


def test_unknown_logical_axis_names_the_file_and_key(tmp_path):
    bad = _write_strategy(tmp_path / "typo.toml", 'haeds = "tensor"')
    with pytest.raises(UsageError, match=r"typo\.toml: key 'haeds' is not a logical axis.*embed"):
        Strategy.load(bad)
    bad = _write_strategy(tmp_path / "typo2.toml", 'heads = "tensor"', 'activation_hedas = "fsdp"')
    with pytest.raises(UsageError, match=r"typo2\.toml: key 'activation_hedas'"):
        Strategy.load(bad)
    bad = _write_strategy(tmp_path / "alone.toml", 'embed = "fsdp"', 'heads = "tensor"')
    with pytest.raises(UsageError, match=r"alone\.toml: \[fallback\] heads: a second choice needs a first one"):
        Strategy.load(bad)
    bad = _write_strategy(tmp_path / "value.toml", "heads = 3")
    with pytest.raises(UsageError, match=r"value\.toml: \[rules\] heads = 3: expected a mesh axis"):
        Strategy.load(bad)
    bad = tmp_path / "table.toml"
    bad.write_text('[mesh]\naxes = ["x"]\nici = [-1]\ndcn = [-1]\n[rule]\nembed = "x"\n')
    with pytest.raises(UsageError, match=r"table\.toml: expected keys description, mesh, rules, fallback"):
        Strategy.load(bad)


def _used_logical_axes(monkeypatch):
    """{model: (names on its parameters, names on its activation constraints)}, tiny presets,
    from the boxes of jax.eval_shape(model.init) and a traced apply that records every
    nn.with_logical_constraint."""
    seen: set = set()
    constrain = nn.with_logical_constraint

    def recording(x, names, *args, **kwargs):
        seen.update(jax.tree.leaves(names))
        return constrain(x, names, *args, **kwargs)

    monkeypatch.setattr(nn, "with_logical_constraint", recording)
    fc = FluxConfig.preset("tiny")
    b, l_img, l_txt = 1, 4, 3
    ids = jnp.zeros((b, 8), jnp.int32)
    cases = {
        "transformer": (Flux(fc), (jnp.zeros((b, l_img, fc.in_channels)), jnp.zeros((b, l_img, 3)),
                                   jnp.zeros((b, l_txt, fc.context_in_dim)), jnp.zeros((b, l_txt, 3)), jnp.zeros((b,)),
                                   jnp.zeros((b, fc.vec_in_dim)), jnp.zeros((b,)))),
        "t5": (T5Encoder(T5Config.preset("tiny")), (ids,)),
        "clip": (CLIPTextEncoder(CLIPConfig.preset("tiny")), (ids,)),
        "vae": (AutoEncoder(AutoEncoderConfig.preset("tiny")), (jnp.zeros((b, 16, 16, 3)),)),
    }
    used = {}
    for name, (model, inputs) in cases.items():
        boxed = jax.eval_shape(model.init, jax.random.key(0), *inputs)["params"]
        params = {n for box in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)) for n in box.names}
        seen.clear()
        jax.eval_shape(lambda p, *a: model.apply({"params": p}, *a), nn.unbox(boxed), *inputs)
        used[name] = (params - {None}, set(seen) - {None})
    return used


def test_the_vocabulary_is_every_logical_axis_the_models_use(monkeypatch):
    used = _used_logical_axes(monkeypatch)
    for model, (params, constraints) in used.items():
        assert params <= set(PARAMETER_AXES), (model, params - set(PARAMETER_AXES))
        assert constraints <= set(ACTIVATION_AXES), (model, constraints - set(ACTIVATION_AXES))
    for model in ("transformer", "t5", "clip"):  # the recorder saw the constraints at all
        assert "activation_batch" in used[model][1], model
    everything = set().union(*(p | c for p, c in used.values()))
    assert everything == set(AXES), f"listed but used by no model: {set(AXES) - everything}"
    assert all(len(text.split()) >= 3 for text in AXES.values())  # each name says what it is


def test_fallback_is_a_second_choice_after_every_rule(tmp_path, caplog):
    """heads: tensor, else fsdp, else replicated; every [rules] entry is tried before a fallback."""
    s = Strategy.load(_write_strategy(tmp_path / "mine.toml", 'heads = "tensor"\nembed = "fsdp"', 'heads = "fsdp"'))
    assert s.rules == (("heads", "tensor"), ("embed", "fsdp"), ("heads", "fsdp"))  # Flax's rule list
    assert s.mesh_axes("heads") == ("tensor",)
    mesh = types.SimpleNamespace(shape={"fsdp": 2, "tensor": 8})
    spec, notes = s.spec(("heads", "embed"), (32, 16), mesh)  # tensor divides 32: the first choice
    assert tuple(spec) == ("tensor", "fsdp") and not notes
    spec, notes = s.spec((None, "heads"), (32, 4), mesh)  # 4 heads on 8: the fallback
    assert tuple(spec) == (None, "fsdp") and notes == ["heads=4 not divisible by tensor=8: on fsdp instead"]
    spec, notes = s.spec(("heads", "embed"), (4, 16), mesh)  # embed's rule comes before heads' fallback
    assert tuple(spec) == (None, "fsdp") and notes == ["heads=4 not divisible by tensor=8: replicated"]
    spec, notes = s.spec(("heads", "embed"), (3, 16), mesh)  # neither choice divides 3
    assert tuple(spec) == (None, "fsdp") and notes == ["heads=3 not divisible by tensor=8, fsdp=2: replicated"]

    boxed = {"bias": _box((32, 4), (None, "heads")), "kernel": _box((32, 16), ("heads", "embed"))}
    specs, notes = s.param_specs(boxed, mesh)
    assert tuple(specs["bias"]) == (None, "fsdp") and tuple(specs["kernel"]) == ("tensor", "fsdp")
    assert notes == ["bias: heads=4 not divisible by tensor=8: on fsdp instead"]
    with caplog.at_level("INFO", logger="fluxjax.parallel.strategies"):  # the loaders' sharding= logs the choice
        shardings = s.param_shardings(jax.sharding.AbstractMesh((2, 8), ("fsdp", "tensor")))(boxed)
    assert shardings["bias"].spec == specs["bias"]
    assert [r.getMessage() for r in caplog.records] == ["sharding mine: bias: heads=4 not divisible by tensor=8: on fsdp instead"]


def _box(shape, names):
    return nn.LogicallyPartitioned(jax.ShapeDtypeStruct(shape, np.float32), names)


def test_jit_with_rules_compiles_once_per_strategy():
    """The rules come only from Strategy.activate; the compile cache still tells strategies apart."""
    fn = jit_with_rules(lambda x, k: nn.with_logical_constraint(x * k, ("activation_batch", "activation_embed")),
                        static_argnames=("k",))
    fsdp = Strategy.load("fsdp")
    other = dataclasses.replace(fsdp, table=(("activation_embed", ("fsdp",)),))  # the same mesh axes
    mesh = fsdp.make_mesh(jax.devices()[:1])
    compiles = []
    listener = lambda event, duration, **_: compiles.append(event) if "backend_compile" in event else None  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        constraints, counts = [], []
        for strategy, x in ((fsdp, jnp.ones((2, 4))), (fsdp, jnp.zeros((2, 4))), (other, jnp.ones((2, 4)))):
            with strategy.activate(mesh):
                before = len(compiles)
                fn(x, k=2).block_until_ready()
                counts.append(len(compiles) - before)
                constraints += re.findall(r"sharding_constraint[^\n]*", fn.lower(x, 2).as_text())
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert counts == [1, 0, 1], counts  # new values: no compile; another strategy: its own
    assert '[{"fsdp"}, {}]' in constraints[0] and '[{}, {"fsdp"}]' in constraints[2], constraints
