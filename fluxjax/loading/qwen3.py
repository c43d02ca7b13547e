"""transformers Qwen3 safetensors (the hub's klein text_encoder/) -> fluxjax Qwen3Encoder params.

The key table covers `Qwen3Model` (keys `embed_tokens.weight`, `layers.{i}....`, `norm.weight`)
and `Qwen3ForCausalLM`, which is what klein ships: the same keys under `model.`, plus
`lm_head.weight` when the head is not tied to the embedding. The head maps hidden states to
vocabulary logits, which the encoder never computes: it is checked to have the shape the config
gives and left unread. Any other key, a missing key or a wrong shape raises CheckpointError
naming the file and the key.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
from flax import traverse_util

from fluxjax.loading.checkpoint import ShardingFn, leaf_shardings, place
from fluxjax.errors import CheckpointError
from fluxjax.loading.safetensors_io import TensorSource
from fluxjax.loading.table import LAYER, CheckpointTable, Rule, iter_leaves, linear
from fluxjax.models.qwen3 import Qwen3Config, Qwen3Encoder, param_shapes

CAUSAL_LM_PREFIX = "model."
LM_HEAD = "lm_head.weight"


def qwen3_rules(cfg: Qwen3Config, prefix: str = "") -> list[Rule]:
    """The key table of transformers' Qwen3Model (MistralModel when not cfg.qk_norm) for `cfg`,
    every key under `prefix` ("" for Qwen3Model, CAUSAL_LM_PREFIX for Qwen3ForCausalLM)."""
    n = cfg.num_hidden_layers
    layer = f"{prefix}layers.{LAYER}"
    rules = [
        Rule("embed_tokens/embedding", (f"{prefix}embed_tokens.weight",)),
        Rule("norm/scale", (f"{prefix}norm.weight",)),
    ]
    for norm in ("input_layernorm", "post_attention_layernorm"):
        rules.append(Rule(f"layers/{norm}/scale", (f"{layer}.{norm}.weight",), layers=n))
    for norm in ("q_norm", "k_norm") if cfg.qk_norm else ():  # Mistral has none
        rules.append(Rule(f"layers/self_attn/{norm}/scale", (f"{layer}.self_attn.{norm}.weight",), layers=n))
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        rules += linear(f"layers/self_attn/{proj}", f"{layer}.self_attn.{proj}", layers=n, bias=cfg.attention_bias)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        rules += linear(f"layers/mlp/{proj}", f"{layer}.mlp.{proj}", layers=n, bias=False)
    return rules


def lm_head(source: TensorSource, cfg: Qwen3Config, key: str = LM_HEAD) -> set[str]:
    """{key} when the file holds the head there (checked to be (vocab, hidden)), else {}."""
    if key not in source:
        return set()
    want = (cfg.vocab_size, cfg.hidden_size)
    if source.shape(key) != want:
        raise CheckpointError(f"{source.where(key)}: tensor {key!r} has shape {list(source.shape(key))}, "
                              f"expected {list(want)} (vocab_size, hidden_size)")
    return {key}


def read_table(path: str, config: Qwen3Config | None = None) -> CheckpointTable:
    """A transformers Qwen3 folder (config.json + safetensors, single or sharded with its index):
    its config (config.json unless `config` is given), tensors and table."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: expected a transformers Qwen3 folder (config.json + safetensors)")
    cfg = config or Qwen3Config.from_hf_config(path)
    if not cfg.qk_norm:  # its keys sit elsewhere (Mistral3's language_model.model.): named as missing otherwise
        raise CheckpointError(f"{path}: config.json describes a Mistral, not a Qwen3; load it with "
                              "fluxjax.loading.mistral.load_mistral")
    tensors = TensorSource(path)
    # Qwen3ForCausalLM's keys sit under `model.` beside the head, so the prefix cannot be one the
    # table strips from every key: the rules are written with it.
    prefix = CAUSAL_LM_PREFIX if any(k.startswith(CAUSAL_LM_PREFIX) for k in tensors.keys()) else ""
    return CheckpointTable(cfg, tensors, qwen3_rules(cfg, prefix), ignore=frozenset(lm_head(tensors, cfg)))


def load_qwen3(source: str | os.PathLike, dtype="float32", sharding: ShardingFn | None = None,
               config: Qwen3Config | None = None):
    """A Qwen3Encoder and its parameters from a transformers Qwen3 folder (the hub's klein
    text_encoder/: config.json + safetensors, single or sharded with its index json).

    dtype: parameters and activations ("float32", "bfloat16", ...). sharding: a callable from the
    boxed abstract params to a tree of Shardings (fluxjax.loading.checkpoint.ShardingFn), None: one device.
    Every key, shape and dtype is checked before the first tensor is read; tensors are read one at
    a time, each placed on its devices as it comes.
    Returns (model, params) for `model.apply({"params": params}, ids, mask, layers)`.
    """
    return load_table(read_table(source, config), dtype, sharding)


def load_table(table: CheckpointTable, dtype="float32", sharding: ShardingFn | None = None):
    """(Qwen3Encoder, params) from a checked table (read_table here, or loading.mistral's): as load_qwen3."""
    dtype = jnp.dtype(dtype)
    model = Qwen3Encoder(table.config, dtype=dtype, param_dtype=dtype)
    shapes = param_shapes(model)
    shardings = leaf_shardings(shapes, sharding)
    leaves = iter_leaves(table.source, table.rules, shapes, dtype, ignore=table.ignore)
    params = {p: place(value, shardings[p]) for p, value in leaves}
    return model, traverse_util.unflatten_dict(params, sep="/")
