"""The component registry and the one loader over it.

`COMPONENTS` names every model fluxjax loads, with its linen module, config class, key tables
(the `read_table` of its layout module) and abstract-shape helper (`param_shapes` beside the
model). `load(component, source, ...)` reads any of them from a PyTorch checkpoint or an Orbax
folder; `load_transformer`, `load_t5`, `load_clip` and `load_vae` are its public names. The
pipeline, the planner and the tiny preset (`random_component`) build their models here too.

Parameters come out in the layout the model runs, the one checkpoints, key tables and Orbax
folders hold: blocks stacked over a leading `layers` axis (nn.scan).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fluxjax.loading.checkpoint import (MARKER, PARAMS, ShardingFn, flat, is_component, leaf_shardings, place, read_marker,
                                restore_params)
from fluxjax.errors import UsageError
from fluxjax.config import FLUX2_CLASS, AutoEncoderConfig, CLIPConfig, FluxConfig, T5Config
from fluxjax.loading import clip, flux, t5, vae
from fluxjax.loading.table import CheckpointTable, Plan
from fluxjax.models import autoencoder as autoencoder_model
from fluxjax.models import clip as clip_model
from fluxjax.models import flux as flux_model
from fluxjax.models import t5 as t5_model
from fluxjax.models.quantize import check_mode, quantize_leaves, quantized_kernels
from fluxjax.loading.random_weights import host_random_params


@dataclasses.dataclass(frozen=True)
class ComponentSpec:
    """One loadable model.

    kind:    what an Orbax component folder records ("flux", "t5", "clip", "vae").
    folder:  its subfolder in a hub (diffusers) pipeline folder.
    hf_class: the class name hub configs give it (model_index.json, config.json).
    hf_aliases: other class names of the same model, told apart by their config (FLUX.2's transformer).
    model, config: the linen module and its config dataclass.
    read_table: (path, config or None) -> CheckpointTable, the key tables of its layouts.
    shapes:  model -> its boxed abstract parameter tree (the `param_shapes` beside the model).
    options: the model attributes `load` sets besides config and dtypes.
    """

    kind: str
    folder: str
    hf_class: str
    model: type
    config: type
    read_table: Callable[[str, Any], CheckpointTable]
    shapes: Callable[[Any], Any]
    options: tuple[str, ...] = ()
    hf_aliases: tuple[str, ...] = ()

    def select(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The pipeline-wide settings in `options` that this component takes (the VAE has no attention)."""
        return {k: v for k, v in options.items() if k in self.options}


COMPONENTS: dict[str, ComponentSpec] = {
    "transformer": ComponentSpec("flux", "transformer", "FluxTransformer2DModel", flux_model.Flux, FluxConfig,
                                 flux.read_table, flux_model.param_shapes, ("attention_impl", "quantize"), (FLUX2_CLASS,)),
    "t5": ComponentSpec("t5", "text_encoder_2", "T5EncoderModel", t5_model.T5Encoder, T5Config,
                        t5.read_table, t5_model.param_shapes, ("attention_impl", "quantize")),
    "clip": ComponentSpec("clip", "text_encoder", "CLIPTextModel", clip_model.CLIPTextEncoder, CLIPConfig,
                          clip.read_table, clip_model.param_shapes, ("attention_impl",)),
    "vae": ComponentSpec("vae", "vae", "AutoencoderKL", autoencoder_model.AutoEncoder, AutoEncoderConfig,
                         vae.read_table, autoencoder_model.param_shapes),
}

# Whole-pipeline presets: each component's config preset (the planner's --model, the tiny pipeline).
PRESETS: dict[str, dict[str, str]] = {
    "dev": dict(transformer="dev", t5="xxl", clip="large", vae="flux"),
    "schnell": dict(transformer="schnell", t5="xxl", clip="large", vae="flux"),
    "tiny": dict(transformer="tiny", t5="tiny", clip="tiny", vae="tiny"),
}


def spec(component: str) -> ComponentSpec:
    if component not in COMPONENTS:
        raise ValueError(f"component {component!r}: choose from {', '.join(COMPONENTS)}")
    return COMPONENTS[component]


def build(component: str, config, dtype="float32", **options):
    """The linen module of `component` for `config`, parameters and compute in `dtype`.

    options: the component's settings (ComponentSpec.options).
    """
    s = spec(component)
    unknown = sorted(set(options) - set(s.options))
    if unknown:
        raise TypeError(f"{component}: no setting {', '.join(unknown)} (it takes {', '.join(s.options) or 'none'})")
    check_mode(options.get("quantize"))
    dt = jnp.dtype(dtype)
    return s.model(config, dtype=dt, param_dtype=dt, **options)


def abstract_params(component: str, model) -> Any:
    """The boxed abstract parameter tree of `model` (blocks stacked, as checkpoints hold them)."""
    return spec(component).shapes(model)


def _place(component: str, model, leaves: Iterable[tuple[str, np.ndarray]], sharding: ShardingFn | None) -> dict:
    """Host leaves of the stacked, unquantized layout -> the parameter tree `model` runs, each leaf
    on its devices; the Linears `model` quantizes quantized here on the host, one leaf at a
    time, so their unquantized weights never reach a device.
    """
    shapes = abstract_params(component, model)
    if getattr(model, "quantize", None) is not None:
        leaves = quantize_leaves(leaves, model.quantize, quantized_kernels(flat(shapes)))
    shardings = leaf_shardings(shapes, sharding)
    out = {path: place(value, shardings[path]) for path, value in leaves}
    return traverse_util.unflatten_dict(out, sep="/")


def _in_pipeline_folder(component: str, path: str) -> str:
    """`path`, or its subfolder for `component` when `path` is a pipeline folder (hub or converted)."""
    sub = os.path.join(path, spec(component).folder)
    if os.path.isdir(path) and not is_component(path) and not os.path.isfile(os.path.join(path, "config.json")) \
            and os.path.isdir(sub):
        return sub
    return path


def plan(component: str, source: str | os.PathLike, dtype="float32", config=None, **options) -> Plan:
    """The conversion plan of a PyTorch checkpoint of `component` (every check run, nothing read):
    its leaves are the checkpoint's, unquantized (`load` quantizes them as it places them)."""
    table = spec(component).read_table(os.fspath(source), config)
    model = build(component, table.config, dtype, **options)
    return Plan(spec(component).kind, model, abstract_params(component, model), table)


def load(component: str, source: str | os.PathLike, dtype="float32", sharding: ShardingFn | None = None,
         config=None, **options):
    """`(model, params)` of `component` ("transformer", "t5", "clip" or "vae") from a checkpoint.

    source:   a PyTorch checkpoint in a layout of the component (see each `load_*`), the Orbax
              component folder `fluxjax convert` wrote, or a pipeline folder holding either in
              the component's hub subfolder.
    dtype:    parameter and compute dtype ("float32", "bfloat16", or a jnp dtype).
    sharding: a callable from the boxed abstract params to a matching tree of Shardings
              (fluxjax.loading.checkpoint.ShardingFn); every leaf lands straight in its sharding. None: one device.
    config:   the component's config instead of the one the checkpoint gives.
    options:  the component's settings (attention_impl; the transformer's and T5's quantize
              None, "int8" or "fp8": their Linears quantized on the host as they are read, see
              fluxjax/models/quantize.py).
    Params are read one tensor at a time into the shapes `jax.eval_shape` gives (never
    initialised), in the layout the model runs. Raises CheckpointError naming the file and key
    on a missing or extra key or a wrong shape.
    """
    path = _in_pipeline_folder(component, os.fspath(source))
    dtype = jnp.dtype(dtype)
    if not is_component(path):
        p = plan(component, path, dtype, config, **{k: v for k, v in options.items() if k != "quantize"})
        model = build(component, p.config, dtype, **options)
        return model, _place(component, model, p.leaves(dtype), sharding)
    marked = marker_config(component, path)
    held = stored_quantize(component, path, options.get("quantize"))
    model = build(component, config or marked, dtype, **options)
    stored = model if held else _unquantized(model)
    shapes = abstract_params(component, stored)
    folder = os.path.join(path, PARAMS)
    if stored is model:
        # Quantized values and their float32 scales keep their dtypes; every other leaf is cast to `dtype`.
        return model, restore_params(folder, shapes, None if held else dtype, sharding)
    # Orbax holds the unquantized stacks: restored whole into host memory (the CPU device, also
    # beside an accelerator), then quantized one leaf at a time (each leaf released once placed).
    leaves = flat(restore_params(folder, shapes, dtype, on_host))
    return model, _place(component, model, ((p, np.asarray(leaves.pop(p))) for p in list(leaves)), sharding)


def model_of(component: str, source: str | os.PathLike, dtype="float32", config=None, **options):
    """The linen module `load(component, source, dtype, config=config, **options)` builds, from the
    checkpoint's header or the converted folder's marker alone (no weight is read): what its
    parameters will weigh is `abstract_params(component, model_of(...))`."""
    path = _in_pipeline_folder(component, os.fspath(source))
    if is_component(path):
        return build(component, config or marker_config(component, path), dtype, **options)
    return build(component, spec(component).read_table(path, config).config, dtype, **options)


def stored_quantize(component: str, path: str | os.PathLike, quantize: str | None) -> str | None:
    """The quantization a converted `component` folder stores its Linears in (None: unquantized),
    checked against the `quantize` asked for: a quantized folder loads only as it was quantized
    (its unquantized weights are gone). ValueError naming the folder otherwise."""
    held = read_marker(path, spec(component).kind).get("quantize")
    if held is not None and held != quantize:
        raise ValueError(f"{os.fspath(path)}: holds {held}-quantized weights (fluxjax convert --quantize {held}); "
                         f"load it with quantize={held!r} (--quantize {held}), not {quantize!r}, or convert the "
                         "source again without --quantize")
    return held


def quantized_leaves(component: str, model, leaves: Iterable[tuple[str, np.ndarray]], mode: str):
    """Stream the stacked, unquantized leaves of `model` (a Plan's) with the Linears that `model`
    built with quantize=`mode` quantizes replaced by their values and scales: what an Orbax folder
    converted with --quantize holds, and `load` restores as it is."""
    kernels = quantized_kernels(flat(abstract_params(component, model.clone(quantize=mode))))
    return quantize_leaves(leaves, mode, kernels)


def component_of(kind: str) -> str:
    """The component name whose Orbax folders record `kind` ("flux" -> "transformer")."""
    return next(name for name, s in COMPONENTS.items() if s.kind == kind)


def _unquantized(model):
    """`model` with its Linears unquantized: the layout checkpoints and random weights come in."""
    return model.clone(quantize=None) if getattr(model, "quantize", None) else model


def host_device():
    """This process's CPU device (host memory; it exists beside an accelerator's backend unless
    JAX_PLATFORMS leaves "cpu" out); UsageError without one."""
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:
        raise UsageError("the text encoders are to run on the host CPU, and JAX's CPU backend is off "
                         "(JAX_PLATFORMS leaves out cpu): add it, e.g. JAX_PLATFORMS=tpu,cpu") from None


def on_host(shapes):
    """A ShardingFn placing every leaf on this process's CPU device (`host_device`)."""
    host = jax.sharding.SingleDeviceSharding(host_device())
    return jax.tree.map(lambda _: host, shapes)


def marker_config(component: str, path: str | os.PathLike):
    """The config a converted `component` folder's fluxjax.json records, as the component's config
    class; ValueError naming that file when it makes none (an edited file: the config class's own
    message names neither the file nor the folder)."""
    s = spec(component)
    record = read_marker(path, s.kind)
    try:
        return s.config(**record["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{os.path.join(os.fspath(path), MARKER)}: not a valid {s.config.__name__} "
                         f"({type(e).__name__ + ': ' if isinstance(e, (KeyError, TypeError)) else ''}{e})") from None


def random_component(component: str, config, dtype="float32", sharding: ShardingFn | None = None, seed: int = 0,
                     **options):
    """`(model, params)` of `component` with random parameters, as `load` places read ones.

    Drawn on the host by fluxjax.loading.random_weights from the stacked abstract tree, with norm scales 1
    and other vectors 0 as the model's own init sets them: the same values on every machine for
    a seed, whatever sharding they are placed in. For small models (the tiny preset).
    """
    model = build(component, config, dtype, **options)
    host = host_random_params(abstract_params(component, _unquantized(model)), seed, neutral_vectors=True)
    return model, _place(component, model, flat(host).items(), sharding)


def load_transformer(source: str | os.PathLike, dtype="float32", config: FluxConfig | None = None,
                     attention_impl: str = "auto", sharding: ShardingFn | None = None):
    """Load a FLUX transformer checkpoint into `(model, params)`.

    source:   a diffusers transformer folder (config.json + safetensors, sharded or not), a BFL
              single file (config inferred from its shapes unless `config` is given): .safetensors
              in bf16/fp32 or fp8 (ComfyUI/Kijai, with or without scale_weight) or a GGUF
              (city96's; docs/quantized_files.md), dequantized to `dtype` as it is read; or what
              `fluxjax convert` wrote: a transformer component folder, or the converted hub
              folder holding one in transformer/.
    dtype:    parameter and activation dtype ("float32", "bfloat16", or a jnp dtype).
    sharding: a callable from the boxed abstract params to a matching tree of Shardings
              (fluxjax.loading.checkpoint.ShardingFn); every leaf lands straight in its sharding. None: one device.
    Returns the linen `Flux` module and its params (nested dict of jax arrays).
    """
    return load("transformer", source, dtype, sharding, config, attention_impl=attention_impl)


def load_t5(source: str | os.PathLike, dtype="float32", attention_impl: str = "auto",
            sharding: ShardingFn | None = None):
    """A T5Encoder and its parameters from a transformers folder (config.json + safetensors,
    single or sharded with its index json, e.g. the hub's text_encoder_2/), or from the
    text_encoder_2/ component folder `fluxjax convert` wrote.

    dtype: parameters and activations ("float32", "bfloat16", ...). sharding: as `load_transformer`.
    Returns (model, params), params a nested dict of jax arrays for `model.apply({"params": params}, ids)`.
    """
    return load("t5", source, dtype, sharding, attention_impl=attention_impl)


def load_clip(source: str | os.PathLike, dtype: Any = "float32", attention_impl: str = "auto",
              sharding: ShardingFn | None = None):
    """Load a transformers CLIPTextModel folder (the hub's `text_encoder/`: config.json and
    model.safetensors, or a sharded index), or the text_encoder/ component folder `fluxjax convert` wrote.

    dtype: the dtype of the parameters and of the computation. sharding: as `load_transformer`.
    Returns (model, params): `model.apply({"params": params}, ids)` gives
    (last_hidden_state (B, L, D), pooler_output (B, D)).
    """
    return load("clip", source, dtype, sharding, attention_impl=attention_impl)


def load_vae(source: str | os.PathLike, dtype="float32", config: AutoEncoderConfig | None = None,
             sharding: ShardingFn | None = None):
    """Load the FLUX VAE from a checkpoint, strictly (every key used, every parameter filled).

    source: a diffusers `AutoencoderKL` folder (config.json + one safetensors file, or sharded
            with an index; a pipeline folder holding vae/ also works), a single .safetensors
            file in BFL (`ae.safetensors`) or diffusers layout, told apart by its keys, or the
            vae component folder `fluxjax convert` wrote (or the converted hub folder holding it).
    dtype:  parameter and compute dtype. sharding: as `load_transformer`.
    config: the AutoEncoderConfig; default: the folder's config.json, for a single file the
            "flux" preset.
    Returns (model, params): an `AutoEncoder` and its parameter tree of jax arrays.
    """
    return load("vae", source, dtype, sharding, config)
