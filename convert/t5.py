"""transformers `T5EncoderModel` safetensors (the hub's text_encoder_2/) -> fluxjax T5Encoder params.

The token embedding is one tensor under two names: `shared.weight` and
`encoder.embed_tokens.weight` are tied in PyTorch. transformers' save_pretrained writes only
`shared.weight`; other writers may keep both, or only the encoder's. The table reads whichever
one is stored; where both are, they must be identical (a file where they differ is refused).
"""

from __future__ import annotations

import os
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from convert.safetensors_io import CheckpointError, TensorSource
from convert.table import LAYER, Rule, linear, load_params
from fluxjax.config import T5Config
from fluxjax.models.t5 import T5Encoder

EMBED_KEY = "shared.weight"
EMBED_ALIAS = "encoder.embed_tokens.weight"


def t5_rules(cfg: T5Config, embed_key: str = EMBED_KEY) -> list[Rule]:
    """The key table of transformers' T5EncoderModel for `cfg`.

    embed_key: the name the token embedding is stored under, EMBED_KEY or EMBED_ALIAS
    (`t5_source(path).embed_key` tells which).
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


class _TiedSource(TensorSource):
    """A TensorSource that holds a tied pair of keys at most once.

    Where both `name` and `alias` are stored they must be the same tensor (shape, dtype and
    values), and `alias` is hidden. `embed_key` is the one of the pair the table should read:
    `name` unless only `alias` is stored (if neither is, the table reports `name` missing).
    """

    def __init__(self, path: str | os.PathLike, name: str, alias: str):
        super().__init__(path)
        self._hidden: str | None = None
        stored = super().keys()
        if name in stored and alias in stored:
            self._check_same(name, alias)
            self._hidden = alias
        self.embed_key = alias if alias in stored and name not in stored else name

    def _check_same(self, name: str, alias: str) -> None:
        a_where, b_where = self.where(name), self.where(alias)
        a_shape, b_shape = self.shape(name), self.shape(alias)
        if a_shape != b_shape:
            raise CheckpointError(
                f"{b_where}: tensor {alias!r} has shape {list(b_shape)} but its tied twin {name!r} "
                f"in {a_where} has {list(a_shape)}; they must be the same tensor"
            )
        a, b = self.read(name), self.read(alias)
        if a.dtype != b.dtype or not np.array_equal(a, b):
            raise CheckpointError(
                f"{b_where}: tensor {alias!r} differs from its tied twin {name!r} in {a_where}; "
                "they must be the same tensor"
            )

    def keys(self) -> list[str]:
        return [k for k in super().keys() if k != self._hidden]

    def __contains__(self, key: str) -> bool:
        return key != self._hidden and super().__contains__(key)

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())


def t5_source(path: str | os.PathLike) -> _TiedSource:
    """The tensors of a T5 encoder checkpoint (file or folder), a duplicate tied embedding
    checked and hidden; its `embed_key` is the name to give `t5_rules`."""
    return _TiedSource(path, EMBED_KEY, EMBED_ALIAS)


def t5_param_shapes(model: T5Encoder) -> dict:
    """The model's parameter tree of ShapeDtypeStruct (boxed with logical axes), no compute."""
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), ids)["params"]


def load_t5(
    source: str | os.PathLike,
    dtype="float32",
    progress: Callable[[Iterable], Iterable] | None = None,
) -> tuple[T5Encoder, dict]:
    """A T5Encoder and its parameters from a transformers folder (config.json + safetensors,
    single or sharded with its index json, e.g. the hub's text_encoder_2/).

    dtype: parameters and activations ("float32", "bfloat16", ...). The parameters are read
    straight from the file into the shapes `jax.eval_shape` gives, never initialised first.
    Returns (model, params), params a nested dict of jax arrays for `model.apply({"params": params}, ids)`.
    """
    source = os.fspath(source)
    if not os.path.isdir(source):
        raise CheckpointError(f"{source}: expected a transformers T5 folder (config.json + safetensors)")
    cfg = T5Config.from_hf_config(source)
    dtype = jnp.dtype(dtype)
    model = T5Encoder(cfg, dtype=dtype, param_dtype=dtype)
    tensors = t5_source(source)
    rules = t5_rules(cfg, tensors.embed_key)
    flat = traverse_util.flatten_dict(load_params(tensors, rules, t5_param_shapes(model), dtype=dtype, progress=progress))
    # Leaf by leaf, dropping each NumPy array once moved: on a CPU backend the host then holds
    # every tensor once (plus one in flight), not twice.
    params = {k: jax.device_put(flat.pop(k)) for k in list(flat)}
    return model, traverse_util.unflatten_dict(params)
