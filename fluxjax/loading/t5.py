"""transformers `T5EncoderModel` safetensors (the hub's text_encoder_2/) -> fluxjax T5Encoder params.

The token embedding is one tensor under two names: `shared.weight` and
`encoder.embed_tokens.weight` are tied in PyTorch. transformers' save_pretrained writes only
`shared.weight`; other writers may keep both, or only the encoder's. The table reads whichever
one is stored; where both are, they must be identical (a file where they differ is refused).
"""

from __future__ import annotations

import os

import numpy as np

from fluxjax.config import T5Config
from fluxjax.errors import CheckpointError
from fluxjax.loading.safetensors_io import TensorSource
from fluxjax.loading.table import LAYER, CheckpointTable, Rule, linear

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


def read_table(path: str, config: T5Config | None = None) -> CheckpointTable:
    """A transformers T5 folder (config.json + safetensors, e.g. text_encoder_2/): its config
    (config.json unless `config` is given), tensors and table."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: expected a transformers T5 folder (config.json + safetensors)")
    cfg = config or T5Config.from_hf_config(path)
    tensors = TensorSource(path)
    embed_key, ignore = tied_embedding(tensors)
    return CheckpointTable(cfg, tensors, t5_rules(cfg, embed_key), ignore=frozenset(ignore))
