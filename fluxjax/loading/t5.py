"""transformers `T5EncoderModel` safetensors (the hub's text_encoder_2/) -> fluxjax T5Encoder params.

The token embedding is one tensor under two names: `shared.weight` and
`encoder.embed_tokens.weight` are tied in PyTorch. transformers' save_pretrained writes only
`shared.weight`; other writers may keep both, or only the encoder's. The table reads whichever
one is stored; where both are, they must be identical (a file where they differ is refused).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from fluxjax.loading.safetensors_io import CheckpointError, TensorSource
from fluxjax.loading.table import LAYER, Plan, Rule, linear
from fluxjax.checkpoint import ShardingFn, is_component, restore_component
from fluxjax.config import T5Config
from fluxjax.models.t5 import T5Encoder

EMBED_KEY = "shared.weight"
EMBED_ALIAS = "encoder.embed_tokens.weight"


def t5_rules(cfg: T5Config, embed_key: str = EMBED_KEY) -> list[Rule]:
    """The key table of transformers' T5EncoderModel for `cfg`.

    embed_key: the name the token embedding is stored under, EMBED_KEY or EMBED_ALIAS
    (`tied_embedding(source)` tells which).
    """
    n = cfg.num_layers
    blk = f"encoder.block.{LAYER}.layer"
    rules = [
        Rule("shared/embedding", (embed_key,)),
        # Only block 0 owns the bias table in transformers; every block uses it.
        Rule("relative_attention_bias/embedding", ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",)),
        Rule("block/layer_0/layer_norm/scale", (f"{blk}.0.layer_norm.weight",), layers=n),
        Rule("block/layer_1/layer_norm/scale", (f"{blk}.1.layer_norm.weight",), layers=n),
        Rule("final_layer_norm/scale", ("encoder.final_layer_norm.weight",)),
    ]
    for p in ("q", "k", "v", "o"):
        rules += linear(f"block/layer_0/SelfAttention/{p}", f"{blk}.0.SelfAttention.{p}", layers=n, bias=False)
    for p in ("wi_0", "wi_1", "wo"):
        rules += linear(f"block/layer_1/DenseReluDense/{p}", f"{blk}.1.DenseReluDense.{p}", layers=n, bias=False)
    return rules


def tied_embedding(source: TensorSource) -> tuple[str, set[str]]:
    """Which name of the tied embedding pair to read, and the set of keys to ignore.

    Where both names are stored they must be the same tensor (shape, dtype and values): the
    alias is then ignored. Where only the alias is stored, it is read. Where neither is, the
    table reports `shared.weight` missing.
    """
    if EMBED_KEY in source and EMBED_ALIAS in source:
        a, b = source.read(EMBED_KEY), source.read(EMBED_ALIAS)
        if a.shape != b.shape or a.dtype != b.dtype or not np.array_equal(a, b):
            raise CheckpointError(
                f"{source.where(EMBED_ALIAS)}: tensor {EMBED_ALIAS!r} (shape {list(b.shape)}) differs from its "
                f"tied twin {EMBED_KEY!r} in {source.where(EMBED_KEY)} (shape {list(a.shape)}); "
                "they must be the same tensor"
            )
        return EMBED_KEY, {EMBED_ALIAS}
    return (EMBED_ALIAS if EMBED_ALIAS in source else EMBED_KEY), set()


def t5_param_shapes(model: T5Encoder) -> dict:
    """The model's parameter tree of ShapeDtypeStruct (boxed with logical axes), no compute."""
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), ids)["params"]


def t5_plan(source: str | os.PathLike, dtype="float32", attention_impl: str = "auto") -> Plan:
    """The conversion plan of a transformers T5 folder (config.json + safetensors, e.g. text_encoder_2/)."""
    source = os.fspath(source)
    if not os.path.isdir(source):
        raise CheckpointError(f"{source}: expected a transformers T5 folder (config.json + safetensors)")
    cfg = T5Config.from_hf_config(source)
    model, shapes = _build(cfg, dtype, attention_impl)
    tensors = TensorSource(source)
    embed_key, ignore = tied_embedding(tensors)
    return Plan("t5", model, cfg, tensors, t5_rules(cfg, embed_key), shapes, ignore=frozenset(ignore))


def _build(cfg: T5Config, dtype, attention_impl: str):
    dtype = jnp.dtype(dtype)
    model = T5Encoder(cfg, dtype=dtype, param_dtype=dtype, attention_impl=attention_impl)
    return model, t5_param_shapes(model)


def load_t5(
    source: str | os.PathLike,
    dtype="float32",
    attention_impl: str = "auto",
    sharding: ShardingFn | None = None,
) -> tuple[T5Encoder, dict]:
    """A T5Encoder and its parameters from a transformers folder (config.json + safetensors,
    single or sharded with its index json, e.g. the hub's text_encoder_2/), or from the
    text_encoder_2/ component folder `fluxjax convert` wrote.

    dtype: parameters and activations ("float32", "bfloat16", ...). The parameters are read
    straight from the file into the shapes `jax.eval_shape` gives, never initialised first.
    sharding: a callable from the boxed abstract params to a matching tree of Shardings
    (fluxjax.checkpoint.ShardingFn); every leaf lands straight in its sharding. None: one device.
    Returns (model, params), params a nested dict of jax arrays for `model.apply({"params": params}, ids)`.
    """
    if is_component(source):
        build = lambda cfg: _build(cfg, dtype, attention_impl)  # noqa: E731
        return restore_component(source, "t5", T5Config, build, jnp.dtype(dtype), sharding)
    plan = t5_plan(source, dtype, attention_impl)
    return plan.model, plan.load(jnp.dtype(dtype), sharding)
