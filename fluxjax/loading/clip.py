"""transformers `CLIPTextModel` safetensors -> fluxjax CLIPTextEncoder parameters.

The key table covers the tensors of a `CLIPTextModel` (the hub's FLUX `text_encoder/`):

    embeddings.token_embedding.weight          -> token_embedding/embedding     (copy)
    embeddings.position_embedding.weight       -> position_embedding            (copy)
    encoder.layers.{i}.self_attn.{q,k,v,out}_proj.{weight,bias}
                                               -> layers/self_attn/*_proj        (linear, stacked)
    encoder.layers.{i}.layer_norm{1,2}.{weight,bias}
                                               -> layers/layer_norm{1,2}/{scale,bias}
    encoder.layers.{i}.mlp.fc{1,2}.{weight,bias}
                                               -> layers/mlp/fc{1,2}
    final_layer_norm.{weight,bias}             -> final_layer_norm/{scale,bias}

Two on-disk spellings exist and both load:
* files written by transformers < 5 (the FLUX hub files among them) prefix every key with
  `text_model.`; transformers 5's `save_pretrained` writes the keys without it. The table is
  written without the prefix and the engine strips `text_model.` when every key carries it.
* `embeddings.position_ids` (int64 (1, max_positions), the arange buffer) was saved by
  transformers < 4.31. It holds no weights: it is checked to be exactly arange(max_positions)
  (anything else would change the model's math, so it is an error) and then skipped.
Any other key, a missing key or a wrong shape raises CheckpointError naming the file and key.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fluxjax.loading.safetensors_io import CheckpointError, TensorSource
from fluxjax.loading.table import Plan, Rule, linear
from fluxjax.checkpoint import ShardingFn, is_component, restore_component
from fluxjax.config import CLIPConfig
from fluxjax.models.clip import CLIPTextEncoder

PREFIX = "text_model."
POSITION_IDS = "embeddings.position_ids"
L = "{i}"


def clip_rules(cfg: CLIPConfig) -> list[Rule]:
    """The key table of transformers' CLIPTextModel (keys without the `text_model.` prefix)."""
    n = cfg.num_layers
    layer = f"encoder.layers.{L}"
    rules = [
        Rule("token_embedding/embedding", ("embeddings.token_embedding.weight",)),
        Rule("position_embedding", ("embeddings.position_embedding.weight",)),
        Rule("final_layer_norm/scale", ("final_layer_norm.weight",)),
        Rule("final_layer_norm/bias", ("final_layer_norm.bias",)),
    ]
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        rules += linear(f"layers/self_attn/{proj}", f"{layer}.self_attn.{proj}", layers=n)
    for norm in ("layer_norm1", "layer_norm2"):
        rules.append(Rule(f"layers/{norm}/scale", (f"{layer}.{norm}.weight",), layers=n))
        rules.append(Rule(f"layers/{norm}/bias", (f"{layer}.{norm}.bias",), layers=n))
    for fc in ("fc1", "fc2"):
        rules += linear(f"layers/mlp/{fc}", f"{layer}.mlp.{fc}", layers=n)
    return rules


def _position_ids(source: TensorSource, cfg: CLIPConfig) -> set[str]:
    """The legacy `position_ids` buffer(s) of the file, checked to be arange: keys to ignore."""
    found = set()
    for key in (POSITION_IDS, PREFIX + POSITION_IDS):
        if key not in source:
            continue
        want = np.arange(cfg.max_position_embeddings)[None]
        got = source.read(key)
        if got.shape != want.shape or not np.array_equal(got, want):
            raise CheckpointError(
                f"{source.where(key)}: buffer {key!r} (shape {list(got.shape)}) is not "
                f"arange({cfg.max_position_embeddings}) of shape {list(want.shape)}; fluxjax uses positions 0..L-1"
            )
        found.add(key.removeprefix(PREFIX))
    return found


def param_shapes(model: CLIPTextEncoder, seq_len: int | None = None) -> Any:
    """The model's parameter tree as jax.ShapeDtypeStruct (boxed with logical axes); no weights made."""
    length = seq_len or model.config.max_position_embeddings
    ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), ids)["params"]


def clip_plan(source: str | os.PathLike, dtype: Any = "float32", attention_impl: str = "auto") -> Plan:
    """The conversion plan of a transformers CLIPTextModel folder (or its safetensors file)."""
    source = os.fspath(source)
    folder = source if os.path.isdir(source) else os.path.dirname(source)
    cfg = CLIPConfig.from_hf_config(folder)
    model, shapes = _build(cfg, dtype, attention_impl)
    tensors = TensorSource(source)
    ignore = frozenset(_position_ids(tensors, cfg))
    return Plan("clip", model, cfg, tensors, clip_rules(cfg), shapes, (PREFIX,), ignore)


def _build(cfg: CLIPConfig, dtype, attention_impl: str):
    dt = jnp.dtype(dtype)
    model = CLIPTextEncoder(cfg, dtype=dt, param_dtype=dt, attention_impl=attention_impl)
    return model, param_shapes(model)


def load_clip(
    source: str | os.PathLike,
    dtype: Any = "float32",
    attention_impl: str = "auto",
    sharding: ShardingFn | None = None,
) -> tuple[CLIPTextEncoder, dict]:
    """Load a transformers CLIPTextModel folder (the hub's `text_encoder/`), or the text_encoder/
    component folder `fluxjax convert` wrote.

    source: a folder with config.json and model.safetensors (or a sharded index); dtype: the
    dtype of the parameters and of the computation ("float32" or "bfloat16").
    sharding: a callable from the boxed abstract params to a matching tree of Shardings
    (fluxjax.checkpoint.ShardingFn); every leaf lands straight in its sharding. None: one device.
    Returns (model, params): `model.apply({"params": params}, ids)` gives
    (last_hidden_state (B, L, D), pooler_output (B, D)). Params are jax arrays of `dtype`,
    read straight from the file into the shapes `jax.eval_shape` gives (never initialised).
    """
    if is_component(source):
        build = lambda cfg: _build(cfg, dtype, attention_impl)  # noqa: E731
        return restore_component(source, "clip", CLIPConfig, build, jnp.dtype(dtype), sharding)
    plan = clip_plan(source, dtype, attention_impl)
    return plan.model, plan.load(jnp.dtype(dtype), sharding)
