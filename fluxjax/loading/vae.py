"""Key tables for the FLUX VAE and the FLUX.2 VAE.

Two checkpoint layouts (docs/model-reference.md, "Checkpoint keys", "The autoencoder"):
  BFL       `ae.safetensors`: `encoder.down.{i}.block.{j}.conv1`, `encoder.mid.attn_1.q` (1x1 conv
            [C, C, 1, 1]), `decoder.up.{i}...` with `up.i` = level i, `nin_shortcut`, `norm_out`.
  diffusers `vae/` folder of `AutoencoderKL`: `encoder.down_blocks.{i}.resnets.{j}`,
            `mid_block.attentions.0.to_q` (Linear [C, C]), `decoder.up_blocks.{n-1-i}` (index
            reversed), `conv_shortcut`, `group_norm`, `conv_norm_out`.

The FLUX.2 VAE (diffusers `AutoencoderKLFlux2`, read in its diffusers layout only) adds top-level
`quant_conv`, `post_quant_conv` (1x1 convs) and `bn.running_mean` / `bn.running_var`, whose Flax
paths are the same names; `bn.num_batches_tracked` (a training counter) is allowed and left unused.

Both tables come from one walk over the model's modules (`_modules`), so they cannot disagree
on the model's structure; each layout only names the modules and says how a tensor turns around.
"""

from __future__ import annotations

import os
from typing import Iterator

from fluxjax.config import AutoEncoderConfig
from fluxjax.errors import CheckpointError
from fluxjax.loading.safetensors_io import TensorSource
from fluxjax.loading.table import CheckpointTable, Rule

# Prefixes some redistributions put before every VAE key (SD-style single files, ComfyUI).
STRIP_PREFIXES = ("first_stage_model.", "vae.")
# Left unused if present in a FLUX.2 VAE: its batch norm's step counter (only the statistics matter).
IGNORE = frozenset({"bn.num_batches_tracked"})


def _modules(cfg: AutoEncoderConfig) -> Iterator[tuple[str, str, str, str]]:
    """Every parameterised module: (flax path, kind, BFL module name, diffusers module name).

    kind: "conv" (kernel/bias), "norm" (scale/bias), "attn" (an attention projection: a Dense
    kernel/bias in fluxjax, a 1x1 conv in BFL, a Linear in diffusers) or "stats" (FLUX.2's batch
    norm running_mean/running_var). BFL names are None where fluxjax knows no BFL layout (FLUX.2).
    """
    n = len(cfg.ch_mult)

    def resnet(f, b, d, c_in, c_out):
        for name in ("norm1", "conv1", "norm2", "conv2"):
            yield f"{f}/{name}", name[:-1] if name.startswith("norm") else "conv", f"{b}.{name}", f"{d}.{name}"
        if c_in != c_out:
            yield f"{f}/nin_shortcut", "conv", f"{b}.nin_shortcut", f"{d}.conv_shortcut"

    def mid(f, b, d, c):
        yield from resnet(f"{f}/block_1", f"{b}.block_1", f"{d}.resnets.0", c, c)
        yield f"{f}/attn_1/norm", "norm", f"{b}.attn_1.norm", f"{d}.attentions.0.group_norm"
        for bn, dn in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
            yield f"{f}/attn_1/{bn}", "attn", f"{b}.attn_1.{bn}", f"{d}.attentions.0.{dn}"
        yield from resnet(f"{f}/block_2", f"{b}.block_2", f"{d}.resnets.1", c, c)

    # encoder
    yield "encoder/conv_in", "conv", "encoder.conv_in", "encoder.conv_in"
    c_in = cfg.ch
    for i, mult in enumerate(cfg.ch_mult):
        c_out = cfg.ch * mult
        for j in range(cfg.num_res_blocks):
            yield from resnet(
                f"encoder/down_{i}/block_{j}", f"encoder.down.{i}.block.{j}",
                f"encoder.down_blocks.{i}.resnets.{j}", c_in, c_out,
            )
            c_in = c_out
        if i != n - 1:
            yield (f"encoder/down_{i}/downsample/conv", "conv", f"encoder.down.{i}.downsample.conv",
                   f"encoder.down_blocks.{i}.downsamplers.0.conv")
    yield from mid("encoder/mid", "encoder.mid", "encoder.mid_block", c_in)
    yield "encoder/norm_out", "norm", "encoder.norm_out", "encoder.conv_norm_out"
    yield "encoder/conv_out", "conv", "encoder.conv_out", "encoder.conv_out"
    if cfg.quant_conv:
        yield "quant_conv", "conv", None, "quant_conv"
        yield "post_quant_conv", "conv", None, "post_quant_conv"
    if cfg.batch_norm_eps is not None:
        yield "bn", "stats", None, "bn"

    # decoder: BFL stores level i as up.i; diffusers runs up_blocks in execution order (n-1-i).
    c_in = cfg.ch * cfg.ch_mult[-1]
    yield "decoder/conv_in", "conv", "decoder.conv_in", "decoder.conv_in"
    yield from mid("decoder/mid", "decoder.mid", "decoder.mid_block", c_in)
    for i in reversed(range(n)):
        c_out = cfg.ch * cfg.ch_mult[i]
        for j in range(cfg.num_res_blocks + 1):
            yield from resnet(
                f"decoder/up_{i}/block_{j}", f"decoder.up.{i}.block.{j}",
                f"decoder.up_blocks.{n - 1 - i}.resnets.{j}", c_in, c_out,
            )
            c_in = c_out
        if i != 0:
            yield (f"decoder/up_{i}/upsample/conv", "conv", f"decoder.up.{i}.upsample.conv",
                   f"decoder.up_blocks.{n - 1 - i}.upsamplers.0.conv")
    yield "decoder/norm_out", "norm", "decoder.norm_out", "decoder.conv_norm_out"
    yield "decoder/conv_out", "conv", "decoder.conv_out", "decoder.conv_out"


def _rules(cfg: AutoEncoderConfig, layout: str) -> list[Rule]:
    attn_transform = {"bfl": "conv1x1", "diffusers": "linear"}[layout]
    rules = []
    for flax_path, kind, bfl, diffusers in _modules(cfg):
        src = bfl if layout == "bfl" else diffusers
        if src is None:
            raise ValueError(f"{flax_path}: no {layout} key for it (the FLUX.2 VAE has a diffusers table only)")
        if kind == "stats":
            rules += [Rule(f"{flax_path}/{name}", (f"{src}.{name}",), "copy") for name in ("running_mean", "running_var")]
            continue
        if kind == "norm":
            rules.append(Rule(f"{flax_path}/scale", (f"{src}.weight",), "copy"))
        else:
            rules.append(Rule(f"{flax_path}/kernel", (f"{src}.weight",), "conv" if kind == "conv" else attn_transform))
        rules.append(Rule(f"{flax_path}/bias", (f"{src}.bias",), "copy"))
    return rules


def bfl_vae_rules(cfg: AutoEncoderConfig) -> list[Rule]:
    """Key table for BFL's `ae.safetensors` layout (244 tensors for the FLUX VAE)."""
    return _rules(cfg, "bfl")


def diffusers_vae_rules(cfg: AutoEncoderConfig) -> list[Rule]:
    """Key table for a diffusers `AutoencoderKL` (use_quant_conv / use_post_quant_conv false) or,
    for a config with quant convs and a batch norm, `AutoencoderKLFlux2`."""
    return _rules(cfg, "diffusers")


def _is_diffusers_layout(keys: list[str]) -> bool:
    return any(".down_blocks." in k or ".mid_block." in k or ".up_blocks." in k for k in keys)


def read_table(path: str, config: AutoEncoderConfig | None = None) -> CheckpointTable:
    """A diffusers AutoencoderKL or AutoencoderKLFlux2 folder, or a single VAE .safetensors file in
    BFL (`ae.safetensors`) or diffusers layout, told apart by its keys: its config (the folder's
    config.json, for a single file the "flux" preset, unless `config` is given), tensors and table."""
    if os.path.isdir(path):
        if config is None:
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise CheckpointError(f"{path}: no config.json (expected a diffusers AutoencoderKL folder)")
            config = AutoEncoderConfig.from_hf_config(path)
    elif not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file or folder")
    if config is None:
        config = AutoEncoderConfig.preset("flux")
    tensors = TensorSource(path)
    layout = "diffusers" if _is_diffusers_layout(tensors.keys()) else "bfl"
    if layout == "bfl" and (config.quant_conv or config.batch_norm_eps is not None):
        raise CheckpointError(f"{path}: not in the diffusers layout; the FLUX.2 VAE is read from an "
                              "AutoencoderKLFlux2 folder or file only")
    rules = diffusers_vae_rules(config) if layout == "diffusers" else bfl_vae_rules(config)
    ignore = IGNORE if config.batch_norm_eps is not None else frozenset()
    return CheckpointTable(config, tensors, rules, STRIP_PREFIXES, ignore=ignore)
