"""The one loader over the component registry: the layout it gives, its settings, the tiny preset."""

import pytest

from fluxjax.loading.checkpoint import flat
from fluxjax.config import AutoEncoderConfig
from fluxjax.loading import registry
from fluxjax.loading.registry import COMPONENTS, PRESETS
from fluxjax.loading.to_orbax import PLANS


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
        model, params = registry.random_component(name, config, "float32")
        shapes = {p: (s.shape, s.dtype) for p, s in flat(registry.abstract_params(name, model)).items()}
        assert {p: (v.shape, v.dtype) for p, v in flat(params).items()} == shapes, name
