"""New LoRAs to train on the FLUX transformer, their trainable factors, and writing a trained one
as diffusers does. The adapter layout is fluxjax/lora/adapters.py's."""

from __future__ import annotations

import json
import os
from typing import Sequence

import flax.linen as nn
import numpy as np

from fluxjax.config import FluxConfig
from fluxjax.errors import UsageError
from fluxjax.lora.adapters import Adapters, shape_tree
from fluxjax.lora.formats import STACKS


# The Linears a new LoRA adapts unless told otherwise: attention qkv/proj and the MLP of every block
# (the single block's linear1 is its qkv and MLP input together, linear2 its proj and MLP output).
DEFAULT_TRAIN_TARGETS = tuple(f"double_blocks/{s}_{m}" for s in ("img", "txt") for m in ("attn/qkv", "attn/proj", "mlp/0", "mlp/2")) + (
    "single_blocks/linear1", "single_blocks/linear2")
FACTORS = ("a", "b")  # the leaves of an adapter that train; scale and bias stay fixed


def new_adapters(params, cfg: FluxConfig, rank: int, alpha: float | None = None,
                 targets: Sequence[str] = DEFAULT_TRAIN_TARGETS, seed: int = 0) -> Adapters:
    """One fresh LoRA of `rank` on the Linears `targets` (Flax paths in the stacked layout), to train.

    params: the transformer's parameters or their shapes, blocks stacked.
    alpha: the LoRA's alpha (default: rank, a scale of 1). Initialised as PEFT does: a uniform in
    +-1/sqrt(in) (kaiming-uniform with a=sqrt(5)), b zeros, so the model starts unchanged.
    Returns Adapters with n = 1: a (layers, in, rank), b (layers, rank, out) float32, scale
    (layers, 1, rank) = alpha / rank, bias (layers, 1, out) zeros; host NumPy arrays.
    """
    if rank < 1:
        raise UsageError(f"LoRA rank must be at least 1, got {rank}")
    alpha = float(rank if alpha is None else alpha)
    shapes = shape_tree(nn.meta.unbox(params))
    rng = np.random.default_rng(seed)
    tree: dict = {}
    for target in targets:
        kernel = shapes.get(tuple(target.split("/")) + ("kernel",))
        if kernel is None or not (len(kernel) == 2 or target.split("/")[0] in STACKS):
            raise UsageError(f"LoRA target {target!r} is no Linear of this model (stacked layout), e.g. {DEFAULT_TRAIN_TARGETS[0]!r}")
        *lead, in_dim, out_dim = kernel
        bound = 1.0 / np.sqrt(in_dim)
        node = tree
        for part in target.split("/"):
            node = node.setdefault(part, {})
        node.update(a=rng.uniform(-bound, bound, (*lead, in_dim, rank)).astype(np.float32),
                    b=np.zeros((*lead, rank, out_dim), np.float32),
                    scale=np.full((*lead, 1, rank), alpha / rank, np.float32),
                    bias=np.zeros((*lead, 1, out_dim), np.float32))
    return Adapters(tree, names=("trained",), formats=("fluxjax",))


def split_factors(tree: dict) -> tuple[dict, dict]:
    """An adapter tree -> (its a/b factors, the rest: scale and bias), two trees of the same paths."""
    if "a" in tree and not isinstance(tree["a"], dict):
        return {k: tree[k] for k in FACTORS}, {k: v for k, v in tree.items() if k not in FACTORS}
    pairs = {name: split_factors(sub) for name, sub in tree.items()}
    return {k: v[0] for k, v in pairs.items()}, {k: v[1] for k, v in pairs.items()}


def join_factors(factors: dict, fixed: dict) -> dict:
    """The inverse of `split_factors`."""
    if "a" in factors and not isinstance(factors["a"], dict):
        return {**factors, **fixed}
    return {name: join_factors(sub, fixed[name]) for name, sub in factors.items()}


def _adapter_nodes(tree: dict, prefix: str = ""):
    """(Flax path, adapter leaves) of every adapted Linear in an adapter tree."""
    for name, sub in tree.items():
        path = f"{prefix}{name}"
        if "a" in sub and not isinstance(sub["a"], dict):
            yield path, sub
        else:
            yield from _adapter_nodes(sub, path + "/")


def save_diffusers(path: str | os.PathLike, tree: dict, cfg: FluxConfig) -> None:
    """Write one LoRA (an adapter tree with n = 1, stacked layout, e.g. a trained `new_adapters`)
    as diffusers writes a FLUX transformer LoRA: `transformer.<diffusers module>.lora_A.weight`
    (rank, in) and `.lora_B.weight` (out, rank) in float32, and PEFT's LoraConfig (r, lora_alpha,
    target_modules) as the `lora_adapter_metadata` JSON with the "transformer." prefix.

    A fused Linear diffusers splits (qkv -> to_q/to_k/to_v; a single block's linear1 -> those and
    proj_mlp) gets the same lora_A on each part and the rows of lora_B that land on it: the same
    update W + alpha/r B A. Every Linear must share one rank and alpha (PEFT's r and lora_alpha).
    """
    from safetensors.numpy import save_file

    from fluxjax.lora.formats import diffusers_linears

    nodes = {p: {k: np.asarray(v, np.float32) for k, v in leaves.items()} for p, leaves in _adapter_nodes(tree)}
    ranks = {leaves["a"].shape[-1] for leaves in nodes.values()}
    scales = {float(s) for leaves in nodes.values() for s in np.unique(leaves["scale"])}
    if len(ranks) != 1 or len(scales) != 1 or any(np.any(leaves["bias"]) for leaves in nodes.values()):
        raise UsageError(f"{os.fspath(path)}: a diffusers LoRA file needs one rank and one alpha on every Linear and no "
                         f"bias; these adapters have ranks {sorted(ranks)} and scales {sorted(scales)}")
    rank, = ranks
    alpha = scales.pop() * rank
    tensors, modules = {}, []
    for module, (target, layer, rows) in diffusers_linears(cfg).items():
        if target not in nodes:
            continue
        leaves = nodes[target]
        a, b = (leaves[k] if layer is None else leaves[k][layer] for k in FACTORS)
        tensors[f"transformer.{module}.lora_A.weight"] = np.ascontiguousarray(a.T)
        tensors[f"transformer.{module}.lora_B.weight"] = np.ascontiguousarray((b if rows is None else b[:, rows]).T)
        modules.append(module)
    config = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(modules), "lora_dropout": 0.0, "bias": "none",
              "use_dora": False, "init_lora_weights": True}
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()},
                                                                    indent=2, sort_keys=True)}
    save_file(tensors, os.fspath(path), metadata=metadata)
