"""transformers Mistral3 safetensors (FLUX.2 [dev]'s text_encoder/, Mistral-Small-3.1) -> the params of
fluxjax's decoder (models/qwen3.py with qk_norm=False).

Flux2Pipeline runs `Mistral3ForConditionalGeneration` on text only, so only its language model (a
MistralModel) is read. `save_pretrained` (transformers 5.25, and the 4.x releases FLUX.2 [dev]
was saved with) writes it in the legacy llava layout:

  language_model.model.{embed_tokens,layers.{i}...,norm}.weight   the Mistral decoder (read)
  language_model.lm_head.weight                                   the LM head (checked, unread)
  vision_tower.*, multi_modal_projector.*                         Pixtral and its projector (unread)

Also taken: the module names transformers gives those keys in memory (`model.language_model.`,
`lm_head.weight`, `model.vision_tower.`, `model.multi_modal_projector.`), and a text-only
`MistralForCausalLM` (`model.`) or `MistralModel` (no prefix). The vision keys are left unread by
their prefix, whatever they hold (the encoder never sees an image); any other key, a missing key
or a wrong shape raises CheckpointError naming the file and the key.
"""

from __future__ import annotations

import os

from fluxjax.errors import CheckpointError
from fluxjax.loading.checkpoint import ShardingFn
from fluxjax.loading.qwen3 import LM_HEAD, lm_head, load_table, qwen3_rules
from fluxjax.loading.safetensors_io import TensorSource
from fluxjax.loading.table import CheckpointTable
from fluxjax.models.qwen3 import Qwen3Config

# (decoder prefix, LM head key, vision prefixes) of each layout, the first whose embedding is there wins.
LAYOUTS = (
    ("language_model.model.", "language_model.lm_head.weight", ("vision_tower.", "multi_modal_projector.")),
    ("model.language_model.", LM_HEAD, ("model.vision_tower.", "model.multi_modal_projector.")),
    ("model.", LM_HEAD, ()),
    ("", LM_HEAD, ()),
)


def read_table(path: str | os.PathLike, config: Qwen3Config | None = None) -> CheckpointTable:
    """A transformers Mistral3 (or Mistral) folder: config.json + safetensors, single or sharded with
    its index. Its config (the text_config of config.json unless `config` is given), tensors and table."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: expected a transformers Mistral3 folder (config.json + safetensors)")
    cfg = config or Qwen3Config.from_hf_config(path)
    if cfg.qk_norm:
        raise CheckpointError(f"{path}: config.json describes a Qwen3, not a Mistral; load it with "
                              "fluxjax.loading.qwen3.load_qwen3")
    tensors = TensorSource(path)
    keys = set(tensors.keys())
    prefix, head, vision = next((layout for layout in LAYOUTS if f"{layout[0]}embed_tokens.weight" in keys),
                                LAYOUTS[0])  # none: the missing embedding is named in the saved layout
    unread = {k for k in keys if k.startswith(vision)} | lm_head(tensors, cfg, head)
    return CheckpointTable(cfg, tensors, qwen3_rules(cfg, prefix), ignore=frozenset(unread))


def load_mistral(source: str | os.PathLike, dtype="float32", sharding: ShardingFn | None = None,
                 config: Qwen3Config | None = None):
    """The Mistral decoder of FLUX.2 [dev]'s text encoder and its parameters, from a transformers
    Mistral3ForConditionalGeneration folder (the hub's FLUX.2-dev text_encoder/).

    As loading.qwen3.load_qwen3 (dtype, sharding, every key and shape checked before a tensor is read).
    Returns (model, params) for `model.apply({"params": params}, ids, mask, layers)`; the layers
    Flux2Pipeline stacks are models.qwen3.FLUX2_DEV_LAYERS.
    """
    return load_table(read_table(source, config), dtype, sharding)
