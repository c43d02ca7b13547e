"""The one loader over the component registry: the layout it gives, its settings, the tiny preset."""

import jax
import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel

from fluxjax.loading.checkpoint import flat
from fluxjax.config import AutoEncoderConfig
from fluxjax.loading import registry
from fluxjax.loading.registry import COMPONENTS, PRESETS, load_transformer
from fluxjax.loading.to_orbax import PLANS, convert
from fluxjax.models.flux import BLOCK_STACKS
from fluxjax.testing.reference import randomize_
from test_transformer import CONFIGS, flux_args, make_inputs

CFG = CONFIGS["dev_like"]
DEPTH = {"double_blocks": CFG["num_layers"], "single_blocks": CFG["num_single_layers"]}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A diffusers transformer folder (transformer/) and its Orbax conversion (orbax/)."""
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**CFG).eval()
    randomize_(model, seed=0)
    root = tmp_path_factory.mktemp("loading")
    model.save_pretrained(root / "transformer")
    convert(root / "transformer", root / "orbax", dtype="float32", progress=False)
    return root


@pytest.mark.parametrize("source", ["transformer", "orbax"])
def test_the_loader_gives_per_block_weights_bit_for_bit(root, source):
    model, stacked = load_transformer(root / source)
    per_block_model, per_block = load_transformer(root / source, layer_loop="unrolled")
    assert (model.layer_loop, per_block_model.layer_loop) == ("scan", "unrolled")
    s, u = flat(stacked), flat(per_block)
    want = {p for p in s if not p.startswith(BLOCK_STACKS)}
    want |= {f"{p.split('/')[0]}_{i}/{p.split('/', 1)[1]}" for p in s if p.startswith(BLOCK_STACKS)
             for i in range(DEPTH[p.split("/")[0]])}
    assert set(u) == want
    for path, value in u.items():
        entry, rest = path.split("/", 1)
        stack, _, i = entry.rpartition("_")
        expected = s[f"{stack}/{rest}"][int(i)] if stack in BLOCK_STACKS else s[path]
        np.testing.assert_array_equal(value, expected, err_msg=path)
    args = flux_args(make_inputs(CFG))
    out = jax.jit(per_block_model.apply)({"params": per_block}, *args)
    np.testing.assert_array_equal(out, jax.jit(model.apply)({"params": stacked}, *args))


def test_auto_layer_loop_is_per_block_only_on_a_cpu_without_a_mesh(root):
    cpu = jax.default_backend() == "cpu"
    assert registry.default_layer_loop(None) == ("unrolled" if cpu else "scan")
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    sharding = lambda boxed: jax.tree.map(lambda _: one, flat(boxed))  # noqa: E731
    assert registry.default_layer_loop(sharding) == "scan"
    model, params = load_transformer(root / "transformer", layer_loop="auto")
    assert model.layer_loop == registry.default_layer_loop(None)
    assert ("double_blocks_0" in params) == cpu and ("double_blocks" in params) != cpu


def test_settings_a_component_does_not_take_are_refused():
    with pytest.raises(TypeError, match="vae: no setting attention_impl"):
        registry.build("vae", AutoEncoderConfig.preset("tiny"), attention_impl="xla")
    with pytest.raises(ValueError, match="component 'unet': choose from transformer, t5, clip, vae"):
        registry.build("unet", None)


def test_one_registry_for_converter_presets_and_random_weights():
    assert sorted(PLANS.values()) == sorted(COMPONENTS)  # the converter's class names come from it
    assert len({s.kind for s in COMPONENTS.values()}) == len({s.folder for s in COMPONENTS.values()}) == 4
    for preset in PRESETS.values():
        assert list(preset) == list(COMPONENTS)
    for name, preset in PRESETS["tiny"].items():
        config = COMPONENTS[name].config.preset(preset)
        model, params = registry.random_component(name, config, "float32", **COMPONENTS[name].select({"layer_loop": "scan"}))
        shapes = {p: (s.shape, s.dtype) for p, s in flat(registry.abstract_params(name, model)).items()}
        assert {p: (v.shape, v.dtype) for p, v in flat(params).items()} == shapes, name
