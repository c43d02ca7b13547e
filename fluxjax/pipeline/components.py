"""A pipeline's four components (transformer, T5, CLIP, VAE): a module with its parameters, the
options each is built with, the check that they fit together, and the tiny preset's random ones."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Any

from fluxjax.config import AutoEncoderConfig, CLIPConfig, FluxConfig, T5Config
from fluxjax.errors import UsageError
from fluxjax.loading.registry import COMPONENTS, PRESETS, build, random_component
from fluxjax.pipeline import conditioning
from fluxjax.pipeline.text import PromptTokenizer
from fluxjax.pipeline.tiny_tokenizers import make_tokenizers


@dataclass
class Component:
    """A linen module with its parameters."""

    model: Any
    params: Any


def component_options(component: str, attention_impl: str, quantize: str | None = None) -> dict[str, Any]:
    """The build options of `component` for the pipeline's `attention_impl` and `quantize`. The text
    encoders' attention is masked (T5's position bias, CLIP's causal mask): implementations that
    take no mask ("splash", "cpu") are the transformer's alone, and the encoders resolve "auto".
    quantize reaches the components that take it (the transformer and T5; CLIP and the VAE, 0.2
    and 0.1 of the 12B+4.8B weights, stay in the pipeline's dtype)."""
    masked = component in ("t5", "clip") and attention_impl in ("splash", "cpu")
    return COMPONENTS[component].select(dict(attention_impl="auto" if masked else attention_impl,
                                             quantize=quantize))


def tiny_models(dtype, attention_impl: str, quantize: str | None) -> dict:
    """{name: linen module} of the tiny preset, as tiny_components builds them (no weights)."""
    return {name: build(name, COMPONENTS[name].config.preset(preset), dtype, **component_options(name, attention_impl, quantize))
            for name, preset in PRESETS["tiny"].items()}


def tiny_components(dtype, attention_impl: str, shardings: dict, quantize: str | None) -> tuple[dict, PromptTokenizer]:
    """({name: Component}, tokenizer) of the tiny preset: small random models (fixed seeds, so the
    same weights everywhere, component `name` placed by `shardings[name]`, a ShardingFn or None)
    and locally trained tokenizers."""
    with tempfile.TemporaryDirectory() as folder:
        make_tokenizers(folder)
        tokenizer = PromptTokenizer.from_folder(folder)
    components = {}
    for seed, (name, preset) in enumerate(PRESETS["tiny"].items()):
        spec = COMPONENTS[name]
        components[name] = Component(*random_component(name, spec.config.preset(preset), dtype, shardings[name], seed,
                                                       **component_options(name, attention_impl, quantize)))
    return components, tokenizer


def check_compatible(t: FluxConfig, t5: T5Config, clip: CLIPConfig, vae: AutoEncoderConfig, variant: str = "base") -> None:
    """Raise UsageError (one line, every mismatch) unless a transformer of `variant` and config `t`
    takes what these T5, CLIP and VAE give."""
    problems = []
    if t.context_in_dim != t5.d_model:
        problems.append(f"transformer context_in_dim {t.context_in_dim} != T5 d_model {t5.d_model}")
    if t.vec_in_dim != clip.hidden_size:
        problems.append(f"transformer vec_in_dim {t.vec_in_dim} != CLIP hidden_size {clip.hidden_size}")
    if t.out_channels != vae.z_channels * 4:
        problems.append(f"transformer out_channels {t.out_channels} != 4 x VAE z_channels {vae.z_channels}")
    extra = conditioning.EXTRA_CHANNELS.get(variant, 0)
    if t.in_channels != vae.z_channels * 4 + extra:
        problems.append(f"transformer in_channels {t.in_channels} != 4 x VAE z_channels {vae.z_channels}"
                        + (f" + {extra} ({variant})" if extra else ""))
    if vae.downsample_factor != 8:
        problems.append(f"VAE downsamples by {vae.downsample_factor}, FLUX needs 8")
    if problems:
        raise UsageError("components do not fit together: " + "; ".join(problems))
