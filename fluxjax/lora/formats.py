"""Readers of the FLUX LoRA file formats people publish (docs/model-reference.md, "LoRA formats"), without torch,
for FLUX.1 and FLUX.2 alike: the module names come from the transformer's config (FLUX.2: diffusers'
Flux2Transformer2DModel names, BFL flux2's shared modulations, no vector_in; docs/lora.md, "FLUX.2").

Each format is one entry of `FORMATS`: a test on the file's keys and a reader that turns every
key into `Piece`s (a low-rank pair on one of fluxjax's Linear layers, in BFL names) or
`Replacement`s (a full tensor replacing a parameter). Every key is used or refused: a key that
maps to nothing raises a one-line CheckpointError naming the file and the key.

Layouts (learnt from diffusers/loaders/lora_conversion_utils.py, the formats' public reader):
  diffusers/PEFT  transformer.<diffusers module>.lora_A.weight / .lora_B.weight (/ .lora_B.bias:
                  PEFT's lora_bias); alpha from the `lora_adapter_metadata` JSON (PEFT's lora_alpha,
                  alpha_pattern, use_rslora: scale alpha/sqrt(r)) or `.alpha` keys.
  kohya           lora_unet_<BFL module, '.' -> '_'>.lora_down.weight / .lora_up.weight / .alpha
  comfyui         diffusion_model.<BFL module>.lora_A.weight / .lora_B.weight (or lora_down/up, .alpha);
                  ai-toolkit's FLUX.2 files, which may also name the blocks' Linears by diffusers' names
  bfl_control     <BFL module>.lora_A.weight / .lora_B.weight / .lora_B.bias plus full tensors
                  (QK-norm scales) under their BFL names (FLUX.1-Canny/Depth-dev-lora)
  xlabs           double_blocks.{i}.processor.{qkv,proj}_lora{1,2}.{down,up}.weight,
                  single_blocks.{j}.processor.{qkv,proj}_lora.{down,up}.weight; no alpha (scale 1)
LoKr files (`.lokr_` keys, LyCORIS' Kronecker adapters, published for FLUX.2 too) are refused in one line.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from fluxjax.config import FluxConfig
from fluxjax.loading.flux import (
    DIFFUSERS2_DOUBLE,
    DIFFUSERS2_GUIDANCE,
    DIFFUSERS2_SINGLE,
    DIFFUSERS2_TOP,
    DIFFUSERS_DOUBLE,
    DIFFUSERS_GUIDANCE,
    DIFFUSERS_SINGLE,
    DIFFUSERS_TOP,
    DOUBLE_LINEARS,
    GUIDANCE_LINEARS,
    SHARED_MODULATION_LINEARS,
    SINGLE_LINEARS,
    TOP_LINEARS,
    keeps_linear,
)
from fluxjax.loading.safetensors_io import CheckpointError, TensorSource

STACKS = {"double_blocks": "depth", "single_blocks": "depth_single_blocks"}  # stack -> FluxConfig field


@dataclass
class Piece:
    """One low-rank update of a Linear: W[rows] += scale * up @ down, b[rows] += scale * bias.

    target: the Linear's Flax path in the stacked layout ("double_blocks/img_attn/qkv", "img_in").
    layer:  the block index within the stack, or None outside the blocks.
    down:   (rank, in) float32 (PyTorch layout, `lora_A` / `lora_down`).
    up:     (len(rows), rank) float32 (`lora_B` / `lora_up`).
    rows:   the Linear's output features the rows of `up` land on (int array), None for all.
    scale:  the factor on up @ down and on bias: alpha / rank (PEFT's rsLoRA: alpha / sqrt(rank)).
    bias:   (len(rows),) float32, `lora_B.bias` (BFL control LoRAs, PEFT's lora_bias), or None:
            PEFT computes lora_B(lora_A(x)) * scaling, so B's bias takes the scale as B does.
    key:    the file key that named it (for errors).
    """

    target: str
    layer: int | None
    down: np.ndarray
    up: np.ndarray
    scale: float
    rows: np.ndarray | None
    bias: np.ndarray | None
    key: str


@dataclass
class Replacement:
    """A full tensor replacing a parameter: `leaf` is its Flax path ("double_blocks/img_attn/norm/query_norm/scale")."""

    leaf: str
    layer: int | None
    value: np.ndarray
    key: str


def _bfl_linears(cfg: FluxConfig) -> dict[str, tuple[str, int | None]]:
    """BFL Linear module name ("double_blocks.3.img_attn.qkv") -> (Flax path, layer), of the
    Linears the model of `cfg` has (FLUX.2: no vector_in, the modulations shared outside the blocks)."""
    top = TOP_LINEARS + (GUIDANCE_LINEARS if cfg.guidance_embed else ()) + SHARED_MODULATION_LINEARS
    out = {n: (n.replace(".", "/"), None) for n in top if keeps_linear(cfg, n)}
    for stack, names in (("double_blocks", DOUBLE_LINEARS), ("single_blocks", SINGLE_LINEARS)):
        for i in range(getattr(cfg, STACKS[stack])):
            out.update({f"{stack}.{i}.{n}": (f"{stack}/{n.replace('.', '/')}", i) for n in names if keeps_linear(cfg, n)})
    return out


def diffusers_linears(cfg: FluxConfig) -> dict[str, tuple[str, int | None, np.ndarray | None]]:
    """diffusers module name -> (Flax path, layer, output rows of the BFL Linear it is a part of):
    FluxTransformer2DModel's names, or Flux2Transformer2DModel's for a FLUX.2 config (the tables of
    fluxjax.loading.flux; FLUX.2's single-block Linears are whole, only the double blocks' q/k/v split)."""
    d, m = cfg.hidden_size, cfg.mlp_hidden_dim
    flux2 = cfg.shared_modulation  # only FLUX.2 shares its modulation (fluxjax.loading.flux.diffusers_rules)
    top, guidance = (DIFFUSERS2_TOP, DIFFUSERS2_GUIDANCE) if flux2 else (DIFFUSERS_TOP, DIFFUSERS_GUIDANCE)
    double, single = (DIFFUSERS2_DOUBLE, DIFFUSERS2_SINGLE) if flux2 else (DIFFUSERS_DOUBLE, DIFFUSERS_SINGLE)
    part = lambda k, n: np.arange(k * d, k * d + n)  # noqa: E731
    out = {theirs: (ours, None, None) for ours, theirs in top + (guidance if cfg.guidance_embed else ())
           if keeps_linear(cfg, ours)}
    # diffusers chunks norm_out as (scale, shift), BFL as (shift, scale).
    out["norm_out.linear"] = ("final_layer/adaLN_modulation/1", None, np.concatenate([part(1, d), part(0, d)]))
    for i in range(cfg.depth):
        block = f"transformer_blocks.{i}"
        out.update({f"{block}.{theirs}": (f"double_blocks/{ours}", i, None) for ours, theirs in double})
        for stream, names in (("img", ("to_q", "to_k", "to_v")), ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"))):
            out.update({f"{block}.attn.{n}": (f"double_blocks/{stream}_attn/qkv", i, part(k, d)) for k, n in enumerate(names)})
    for i in range(cfg.depth_single_blocks):
        block = f"single_transformer_blocks.{i}"
        out.update({f"{block}.{theirs}": (f"single_blocks/{ours}", i, None) for ours, theirs in single})
        if not flux2:  # FLUX.1's diffusers model splits linear1 into q, k, v and the MLP input
            out.update({f"{block}.attn.{n}": ("single_blocks/linear1", i, part(k, d))
                        for k, n in enumerate(("to_q", "to_k", "to_v"))})
            out[f"{block}.proj_mlp"] = ("single_blocks/linear1", i, part(3, m))
    return out


def _bfl_norm_leaves(cfg: FluxConfig) -> dict[str, tuple[str, int]]:
    """BFL QK-norm scale key -> (Flax leaf path, layer): what control LoRAs replace."""
    out = {}
    for stack, norms in (("double_blocks", ("img_attn.norm", "txt_attn.norm")), ("single_blocks", ("norm",))):
        for i in range(getattr(cfg, STACKS[stack])):
            for norm in norms:
                for n in ("query_norm", "key_norm"):
                    name = f"{norm}.{n}.scale"
                    out[f"{stack}.{i}.{name}"] = (f"{stack}/{name.replace('.', '/')}", i)
    return out


class _Keys:
    """The file's tensors, with each key checked off as a reader uses it."""

    def __init__(self, source: TensorSource):
        self.source, self.path = source, source.path
        self.unused = set(source.keys())

    def take(self, key: str) -> np.ndarray:
        if key not in self.unused:
            raise CheckpointError(f"{self.path}: key {key!r} is missing (its low-rank partner is in the file)")
        self.unused.discard(key)
        value = np.asarray(self.source.read(key), np.float32)
        if not np.isfinite(value).all():  # fused or run live, one NaN would spread to every pixel
            bad = int(value.size - np.isfinite(value).sum())
            raise self.error(key, f"holds {bad} NaN or infinite value(s) of {value.size}: a damaged or overflowed LoRA")
        return value

    def error(self, key: str, why: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: key {key!r} {why}")


def _pair(keys: _Keys, module_key: str, down_key: str, up_key: str) -> tuple[np.ndarray, np.ndarray]:
    down, up = keys.take(down_key), keys.take(up_key)
    if down.ndim != 2 or up.ndim != 2:
        raise keys.error(down_key, f"and {up_key!r} must be matrices, got shapes {down.shape} and {up.shape}")
    if down.shape[0] != up.shape[1]:
        raise keys.error(up_key, f"has rank {up.shape[1]} but {down_key!r} has rank {down.shape[0]} (A/B rank mismatch)")
    return down, up


def _alpha(keys: _Keys, key: str, rank: int) -> float:
    return float(keys.take(key).reshape(())) if key in keys.unused else float(rank)


def _scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """The factor on up @ down: alpha / rank, or rank-stabilised (PEFT's use_rslora) alpha / sqrt(rank)."""
    return alpha / (rank**0.5 if rslora else rank)


def _text_encoder_refusal(keys: _Keys, key: str) -> CheckpointError:
    return keys.error(key, "is a text-encoder LoRA (CLIP/T5): fluxjax applies LoRAs to the transformer only; "
                      "remove the text-encoder keys from the file to use its transformer part")


def _module_pieces(keys: _Keys, module_key: str, target: tuple, down_key: str, up_key: str, alpha_key: str | None,
                   scale_of=None, bias_key: str | None = None) -> Piece:
    """scale_of: rank -> the scale (PEFT's config), or None: alpha from `alpha_key` (else alpha = rank) / rank."""
    path, layer, rows = target
    down, up = _pair(keys, module_key, down_key, up_key)
    rank = down.shape[0]
    if scale_of is not None:
        scale = scale_of(rank)
    else:
        scale = _scale(_alpha(keys, alpha_key, rank) if alpha_key else float(rank), rank)
    bias = keys.take(bias_key) if bias_key and bias_key in keys.unused else None
    return Piece(path, layer, down, up, scale, rows, bias, up_key)


def _resolve_module(keys: _Keys, table: dict, name: str, key: str, cfg: FluxConfig):
    if name in table:
        return table[name]
    block = re.match(r"(?:transformer_blocks|single_transformer_blocks|double_blocks|single_blocks)[._](\d+)[._]", name)
    if block:
        raise keys.error(key, f"is for a block this model lacks or a module FLUX does not have (the model has "
                         f"{cfg.depth} double and {cfg.depth_single_blocks} single blocks)")
    raise keys.error(key, "names no FLUX transformer module (a LoRA for another model?)")


_LOW_RANK = re.compile(r"^(.*)\.(lora_A|lora_B|lora_down|lora_up)\.weight$")


def _read_low_rank(keys: _Keys, cfg: FluxConfig, table: dict, strip: str, scale_of=None) -> tuple[list, list]:
    """The readers' common loop: `<strip><module>.lora_{A,B,down,up}.weight` (+ `.alpha`, `.lora_B.bias`)."""
    pieces = []
    for key in sorted(keys.unused):
        if key not in keys.unused:
            continue
        m = _LOW_RANK.match(key)
        if m is None or not m.group(1).startswith(strip):
            continue
        module = m.group(1)
        down_name, up_name = ("lora_A", "lora_B") if m.group(2) in ("lora_A", "lora_B") else ("lora_down", "lora_up")
        target = _resolve_module(keys, table, module[len(strip):], key, cfg)
        scale = scale_of(module[len(strip):]) if scale_of else None
        pieces.append(_module_pieces(keys, module, target, f"{module}.{down_name}.weight", f"{module}.{up_name}.weight",
                                     f"{module}.alpha", scale, f"{module}.{up_name}.bias"))
    return pieces, []


def _peft_scale(keys: _Keys, prefix: str):
    """PEFT's adapter config from the file's metadata -> module name -> rank -> scale (None: no
    lora_alpha there, so `.alpha` keys or alpha = rank). PEFT's scaling is lora_alpha / r, or
    lora_alpha / sqrt(r) with use_rslora (rank-stabilised LoRA)."""
    raw = keys.source.metadata().get("lora_adapter_metadata")
    if not raw:
        return None
    config = {k[len(prefix) + 1:]: v for k, v in json.loads(raw).items() if k.startswith(prefix + ".")}
    if "lora_alpha" not in config:
        return None
    patterns = config.get("alpha_pattern") or {}
    numbers = [("lora_alpha", config["lora_alpha"])] + [(f"alpha_pattern[{p!r}]", v) for p, v in patterns.items()]
    for name, value in numbers:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise CheckpointError(f"{keys.path}: metadata lora_adapter_metadata {prefix}.{name} is {value!r}, "
                                  "not a finite number")
    default, rslora = float(config["lora_alpha"]), bool(config.get("use_rslora", False))

    def scale(module: str):
        alpha = default
        # PEFT's rule: a pattern applies to the modules whose name ends with it.
        for pattern, value in patterns.items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                alpha = float(value)
                break
        return lambda rank: _scale(alpha, rank, rslora)

    return scale


def read_diffusers(keys: _Keys, cfg: FluxConfig):
    for key in keys.unused:
        if key.startswith(("text_encoder", "lora_te")):
            raise _text_encoder_refusal(keys, key)
    return _read_low_rank(keys, cfg, diffusers_linears(cfg), "transformer.", _peft_scale(keys, "transformer"))


def read_kohya(keys: _Keys, cfg: FluxConfig):
    for key in sorted(keys.unused):
        if key.startswith("lora_te"):
            raise _text_encoder_refusal(keys, key)
    table = {name.replace(".", "_"): target + (None,) for name, target in _bfl_linears(cfg).items()}
    return _read_low_rank(keys, cfg, table, "lora_unet_")


def _read_bfl(keys: _Keys, cfg: FluxConfig, prefix: str, more: dict | None = None):
    """more: further module names the file may use (-> (Flax path, layer, rows))."""
    table = {name: target + (None,) for name, target in _bfl_linears(cfg).items()} | (more or {})
    pieces, _ = _read_low_rank(keys, cfg, table, prefix)
    norms = _bfl_norm_leaves(cfg)
    replacements = []
    for key in sorted(keys.unused):
        name = key[len(prefix):] if key.startswith(prefix) else None
        if name in norms:
            leaf, layer = norms[name]
            replacements.append(Replacement(leaf, layer, keys.take(key), key))
    return pieces, replacements


_DIFFUSERS_BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")


def read_comfyui(keys: _Keys, cfg: FluxConfig):
    # FLUX.2 files (ai-toolkit's, SimpleTuner's) may name the blocks' Linears by diffusers' names
    # under the same prefix; diffusers' FLUX.2 reader takes those too.
    more = {n: t for n, t in diffusers_linears(cfg).items() if n.startswith(_DIFFUSERS_BLOCKS)} \
        if cfg.shared_modulation else None
    return _read_bfl(keys, cfg, "diffusion_model.", more)


def read_bfl_control(keys: _Keys, cfg: FluxConfig):
    return _read_bfl(keys, cfg, "")


_XLABS = re.compile(r"^(?:diffusion_model\.)?(double_blocks|single_blocks)\.(\d+)\.processor\.(qkv|proj)_lora([12]?)\.down\.weight$")


def read_xlabs(keys: _Keys, cfg: FluxConfig):
    d = cfg.hidden_size
    pieces = []
    for key in sorted(keys.unused):
        m = _XLABS.match(key)
        if m is None:
            continue
        stack, layer, kind, stream = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        if stack == "double_blocks" and stream:
            target = f"double_blocks/{'img' if stream == '1' else 'txt'}_attn/{kind}"
            rows = None
        elif stack == "single_blocks" and not stream:
            # The single block's qkv is the first 3d rows of linear1; its proj is linear2.
            target, rows = ("single_blocks/linear1", np.arange(3 * d)) if kind == "qkv" else ("single_blocks/linear2", None)
        else:
            raise keys.error(key, "is not an XLabs FLUX LoRA key")
        if layer >= getattr(cfg, STACKS[stack]):
            raise keys.error(key, f"is for {stack} {layer}, the model has {getattr(cfg, STACKS[stack])}")
        # No alpha in XLabs files: alpha = rank, a scale of 1.
        pieces.append(_module_pieces(keys, key, (target, layer, rows), key, key.replace(".down.", ".up."), None))
    return pieces, []


@dataclass(frozen=True)
class Format:
    name: str
    detect: Callable[[list[str]], bool]
    read: Callable[[_Keys, FluxConfig], tuple[list[Piece], list[Replacement]]]


def _all(prefixes):
    return lambda ks: all(k.startswith(prefixes) for k in ks)


_BFL_TOP = ("double_blocks.", "single_blocks.", "img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")


# The registry: the first entry whose test accepts the file's keys reads it.
FORMATS = (
    Format("xlabs", lambda ks: all(".processor." in k for k in ks), read_xlabs),
    Format("diffusers", lambda ks: any(k.startswith("transformer.") for k in ks) and _all(("transformer.", "text_encoder"))(ks),
           read_diffusers),
    Format("kohya", _all(("lora_unet_", "lora_te")), read_kohya),
    Format("comfyui", _all(("diffusion_model.",)), read_comfyui),
    Format("bfl_control", _all(_BFL_TOP), read_bfl_control),
)


def read_lora_file(path: str, cfg: FluxConfig) -> tuple[str, list[Piece], list[Replacement]]:
    """Read a LoRA .safetensors for a transformer of `cfg`: (format name, pieces, replacements).

    Raises CheckpointError (one line, naming the file and key) for an unknown layout, a key that
    maps to nothing, an A/B rank mismatch, or a block the model does not have.
    """
    source = TensorSource(path)
    names = sorted(source.keys())
    if not names:
        raise CheckpointError(f"{path}: holds no tensors")
    lokr = next((k for k in names if ".lokr_" in k), None)
    if lokr is not None:  # published for FLUX.2 too; a Kronecker product, not a low-rank pair
        raise CheckpointError(f"{path}: key {lokr!r} is a LoKr (LyCORIS Kronecker) adapter; fluxjax reads LoRAs only")
    for fmt in FORMATS:
        if fmt.detect(names):
            keys = _Keys(source)
            pieces, replacements = fmt.read(keys, cfg)
            if keys.unused:
                raise keys.error(sorted(keys.unused)[0], f"maps to no FLUX parameter (read as a {fmt.name} LoRA)")
            return fmt.name, pieces, replacements
    first = next((k for k in names if not k.startswith(("transformer.", "lora_unet_", "diffusion_model."))), names[0])
    raise CheckpointError(f"{path}: key {first!r} is in no FLUX LoRA format fluxjax reads "
                          f"({', '.join(f.name for f in FORMATS)}): a LoRA for another model?")
