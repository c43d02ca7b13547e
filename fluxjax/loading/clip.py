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

import numpy as np

from fluxjax.config import CLIPConfig
from fluxjax.errors import CheckpointError
from fluxjax.loading.safetensors_io import TensorSource
from fluxjax.loading.table import CheckpointTable, Rule, linear

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


def read_table(path: str, config: CLIPConfig | None = None) -> CheckpointTable:
    """A transformers CLIPTextModel folder (or its safetensors file): its config (the folder's
    config.json unless `config` is given), tensors and table."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    cfg = config or CLIPConfig.from_hf_config(folder)
    tensors = TensorSource(path)
    return CheckpointTable(cfg, tensors, clip_rules(cfg), (PREFIX,), frozenset(_position_ids(tensors, cfg)))
