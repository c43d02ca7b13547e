"""Key tables of the FLUX transformer: BFL single files and diffusers folders, of FLUX.1 and of
FLUX.2 (BFL flux2's `Flux2`, diffusers' `Flux2Transformer2DModel`; the same Flax tree by
FluxConfig's FLUX.2 settings, so BFL flux2 files use the FLUX.1 BFL table less what FLUX.2 lacks).

Flax paths are BFL's module names with '/' (docs/model-reference.md, "The transformer, BFL single
file"), so the BFL table is the identity on names; the diffusers table is the correspondence of
"The transformer, diffusers folder" there. A single file in BFL's keys may be safetensors (fp8
weights dequantized by fluxjax.loading.fp8) or GGUF (city96's, by fluxjax.loading.gguf):
`single_file` tells them apart (docs/quantized_files.md).
"""

from __future__ import annotations

import os
import re

from fluxjax.config import FLUX2_SETTINGS, FluxConfig
from fluxjax.errors import CheckpointError
from fluxjax.loading import fp8, gguf
from fluxjax.loading.safetensors_io import TensorSource
from fluxjax.loading.table import LAYER, CheckpointTable, Rule, fused_linear, linear, strip_prefix

BFL_PREFIXES = ("model.diffusion_model.",)  # added by some redistributions (ComfyUI)
# The general.architecture of FLUX GGUFs: city96's "flux"; "pig" (calcuis' gguf-node) names no
# model, and a file without one (stable-diffusion.cpp's) is judged by its keys, as ComfyUI-GGUF does.
GGUF_ARCHITECTURES = ("flux", "pig")

# Linear layers outside the blocks: BFL module name (also the Flax path, '.' -> '/').
TOP_LINEARS = (
    "img_in", "txt_in", "time_in.in_layer", "time_in.out_layer",
    "vector_in.in_layer", "vector_in.out_layer", "final_layer.linear", "final_layer.adaLN_modulation.1",
)
GUIDANCE_LINEARS = ("guidance_in.in_layer", "guidance_in.out_layer")
DOUBLE_LINEARS = tuple(f"{s}_{m}" for s in ("img", "txt") for m in ("mod.lin", "attn.qkv", "attn.proj", "mlp.0", "mlp.2"))
_DOUBLE_NORMS = tuple(f"{s}_attn.norm.{n}_norm" for s in ("img", "txt") for n in ("query", "key"))
SINGLE_LINEARS = ("linear1", "linear2", "modulation.lin")
_SINGLE_NORMS = ("norm.query_norm", "norm.key_norm")
_BLOCK_MODULATIONS = ("img_mod.lin", "txt_mod.lin", "modulation.lin")  # FLUX.1's per-block modulation
# FLUX.2's modulation, once per block kind (config.shared_modulation), outside the blocks.
SHARED_MODULATIONS = ("double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation")
SHARED_MODULATION_LINEARS = tuple(f"{m}.lin" for m in SHARED_MODULATIONS)
FLUX2_KEY = "double_stream_modulation_img.lin.weight"  # a key only a BFL flux2 file has


def _path(bfl_name: str) -> str:
    return bfl_name.replace(".", "/")


def _bias(cfg: FluxConfig, name: str) -> bool:
    """Whether the Linear `name` (a BFL module name or Flax path) has a bias under `cfg`."""
    return cfg.qkv_bias if name.endswith(("qkv", "linear1")) else cfg.bias


def keeps_linear(cfg: FluxConfig, name: str) -> bool:
    """Whether the model of `cfg` has the Linear `name` (BFL module name or Flax path), of those
    FLUX.1 and FLUX.2 do not share: vector_in, the per-block and the shared modulations."""
    if name.startswith("vector_in"):
        return cfg.vec_in_dim > 0
    if name.startswith(SHARED_MODULATIONS):  # before the next test: single_stream_modulation.lin ends like one
        return cfg.shared_modulation
    if name.replace("/", ".").endswith(_BLOCK_MODULATIONS):
        return not cfg.shared_modulation
    return True


def bfl_rules(cfg: FluxConfig) -> list[Rule]:
    """The table of a BFL single file (flux1-dev.safetensors and friends; flux2's files for a
    FLUX.2 config)."""
    rules: list[Rule] = []
    top = TOP_LINEARS + (GUIDANCE_LINEARS if cfg.guidance_embed else ()) + SHARED_MODULATION_LINEARS
    for name in filter(lambda n: keeps_linear(cfg, n), top):
        rules += linear(_path(name), name, bias=_bias(cfg, name))
    for block, layers, linears, norms in (
        ("double_blocks", cfg.depth, DOUBLE_LINEARS, _DOUBLE_NORMS),
        ("single_blocks", cfg.depth_single_blocks, SINGLE_LINEARS, _SINGLE_NORMS),
    ):
        for name in filter(lambda n: keeps_linear(cfg, n), linears):
            rules += linear(f"{block}/{_path(name)}", f"{block}.{LAYER}.{name}", layers, _bias(cfg, name))
        for name in norms:
            rules.append(Rule(f"{block}/{_path(name)}/scale", (f"{block}.{LAYER}.{name}.scale",), layers=layers))
    return rules


# (Flax path, diffusers module) for plain copies of a Linear.
DIFFUSERS_TOP = (
    ("img_in", "x_embedder"),
    ("txt_in", "context_embedder"),
    ("time_in/in_layer", "time_text_embed.timestep_embedder.linear_1"),
    ("time_in/out_layer", "time_text_embed.timestep_embedder.linear_2"),
    ("vector_in/in_layer", "time_text_embed.text_embedder.linear_1"),
    ("vector_in/out_layer", "time_text_embed.text_embedder.linear_2"),
    ("final_layer/linear", "proj_out"),
)
DIFFUSERS_GUIDANCE = (
    ("guidance_in/in_layer", "time_text_embed.guidance_embedder.linear_1"),
    ("guidance_in/out_layer", "time_text_embed.guidance_embedder.linear_2"),
)
DIFFUSERS_DOUBLE = (
    ("img_mod/lin", "norm1.linear"),
    ("txt_mod/lin", "norm1_context.linear"),
    ("img_attn/proj", "attn.to_out.0"),
    ("txt_attn/proj", "attn.to_add_out"),
    ("img_mlp/0", "ff.net.0.proj"),
    ("img_mlp/2", "ff.net.2"),
    ("txt_mlp/0", "ff_context.net.0.proj"),
    ("txt_mlp/2", "ff_context.net.2"),
)
_DIFFUSERS_DOUBLE_NORMS = (
    ("img_attn/norm/query_norm", "attn.norm_q"),
    ("img_attn/norm/key_norm", "attn.norm_k"),
    ("txt_attn/norm/query_norm", "attn.norm_added_q"),
    ("txt_attn/norm/key_norm", "attn.norm_added_k"),
)
DIFFUSERS_SINGLE = (("linear2", "proj_out"), ("modulation/lin", "norm.linear"))
_DIFFUSERS_SINGLE_NORMS = (("norm/query_norm", "attn.norm_q"), ("norm/key_norm", "attn.norm_k"))


# diffusers' Flux2Transformer2DModel: its names for the modules FLUX.2 renames (the double blocks'
# attention and QK norms keep FLUX.1's diffusers names).
DIFFUSERS2_TOP = (
    ("img_in", "x_embedder"),
    ("txt_in", "context_embedder"),
    ("time_in/in_layer", "time_guidance_embed.timestep_embedder.linear_1"),
    ("time_in/out_layer", "time_guidance_embed.timestep_embedder.linear_2"),
    ("final_layer/linear", "proj_out"),
) + tuple((f"{m}/lin", f"{m}.linear") for m in SHARED_MODULATIONS)
DIFFUSERS2_GUIDANCE = (
    ("guidance_in/in_layer", "time_guidance_embed.guidance_embedder.linear_1"),
    ("guidance_in/out_layer", "time_guidance_embed.guidance_embedder.linear_2"),
)
DIFFUSERS2_DOUBLE = (
    ("img_attn/proj", "attn.to_out.0"),
    ("txt_attn/proj", "attn.to_add_out"),
    ("img_mlp/0", "ff.linear_in"),
    ("img_mlp/2", "ff.linear_out"),
    ("txt_mlp/0", "ff_context.linear_in"),
    ("txt_mlp/2", "ff_context.linear_out"),
)
# One Linear holds q, k, v and the MLP input, as BFL's linear1 does.
DIFFUSERS2_SINGLE = (("linear1", "attn.to_qkv_mlp_proj"), ("linear2", "attn.to_out"))


def diffusers_rules(cfg: FluxConfig) -> list[Rule]:
    """The table of a diffusers transformer folder (transformer/): `FluxTransformer2DModel`, or
    `Flux2Transformer2DModel` for a FLUX.2 config (shared_modulation, which only FLUX.2 has)."""
    d, m = cfg.hidden_size, cfg.mlp_hidden_dim
    flux2 = cfg.shared_modulation
    top, guidance = (DIFFUSERS2_TOP, DIFFUSERS2_GUIDANCE) if flux2 else (DIFFUSERS_TOP, DIFFUSERS_GUIDANCE)
    rules: list[Rule] = []
    for target, module in top + (guidance if cfg.guidance_embed else ()):
        if keeps_linear(cfg, target):
            rules += linear(target, module, bias=_bias(cfg, target))
    # diffusers chunks norm_out as (scale, shift), BFL as (shift, scale).
    for leaf, transform in (("kernel", "linear"), ("bias", "copy"))[: 2 if cfg.bias else 1]:
        key = "norm_out.linear." + ("weight" if leaf == "kernel" else "bias")
        rules.append(Rule(f"final_layer/adaLN_modulation/1/{leaf}", (key,), transform, swap_halves=True))

    blocks = (
        ("double_blocks", "transformer_blocks", cfg.depth, DIFFUSERS2_DOUBLE if flux2 else DIFFUSERS_DOUBLE,
         _DIFFUSERS_DOUBLE_NORMS),
        ("single_blocks", "single_transformer_blocks", cfg.depth_single_blocks,
         DIFFUSERS2_SINGLE if flux2 else DIFFUSERS_SINGLE, _DIFFUSERS_SINGLE_NORMS),
    )
    for block, theirs, layers, linears, norms in blocks:
        src = f"{theirs}.{LAYER}."
        for target, module in linears:
            rules += linear(f"{block}/{target}", src + module, layers, _bias(cfg, target))
        for target, module in norms:
            rules.append(Rule(f"{block}/{target}/scale", (src + module + ".weight",), layers=layers))
    attn = lambda names: [f"transformer_blocks.{LAYER}.attn.{n}" for n in names]  # noqa: E731
    for target, names in (("img_attn", ("to_q", "to_k", "to_v")),
                          ("txt_attn", ("add_q_proj", "add_k_proj", "add_v_proj"))):
        rules += fused_linear(f"double_blocks/{target}/qkv", attn(names), (d, d, d), cfg.depth, cfg.qkv_bias)
    if not flux2:  # FLUX.1's single blocks split linear1 into four Linears
        single = [f"single_transformer_blocks.{LAYER}.{x}" for x in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]
        rules += fused_linear("single_blocks/linear1", single, (d, d, d, m), cfg.depth_single_blocks, cfg.qkv_bias)
    return rules


def config_from_bfl(source) -> FluxConfig:
    """Infer the FluxConfig of a BFL single file (FLUX.1, or flux2's FLUX.2) from its tensor shapes."""
    prefix = strip_prefix(source.keys(), BFL_PREFIXES)
    keys = {k[len(prefix):]: k for k in source.keys()}
    try:
        shape = lambda name: source.shape(keys[name])  # noqa: E731
        flux2 = FLUX2_KEY in keys
        hidden, in_channels = shape("img_in.weight")
        head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale")[0]
        count = lambda prefix: len({int(m.group(1)) for k in keys if (m := re.match(rf"{prefix}\.(\d+)\.", k))})  # noqa: E731
        axes = (FLUX2_SETTINGS["axes_dim"] if flux2 else (16, 56, 56)) if head_dim == 128 else None
        if axes is None:
            raise CheckpointError(
                f"{source.path}: head dim {head_dim} is not FLUX's 128; pass config= with its axes_dim"
            )
        mlp_up = shape("double_blocks.0.img_mlp.0.weight")[0]
        return FluxConfig(**{
            **(FLUX2_SETTINGS if flux2 else {}),
            "in_channels": in_channels,
            "out_channels": shape("final_layer.linear.weight")[0],
            "vec_in_dim": 0 if flux2 else shape("vector_in.in_layer.weight")[1],
            "context_in_dim": shape("txt_in.weight")[1],
            "hidden_size": hidden,
            "mlp_ratio": mlp_up / (2 if flux2 else 1) / hidden,  # SwiGLU's first Linear holds gate and value
            "num_heads": hidden // head_dim,
            "depth": count("double_blocks"),
            "depth_single_blocks": count("single_blocks"),
            "axes_dim": axes,
            "qkv_bias": "double_blocks.0.img_attn.qkv.bias" in keys,
            "bias": "img_in.bias" in keys,
            "guidance_embed": "guidance_in.in_layer.weight" in keys,
        })
    except KeyError as e:
        raise CheckpointError(f"{source.path}: not a BFL FLUX transformer file (no key {e.args[0]!r})") from None


def single_file(path: str):
    """The tensors of a single transformer file, told apart by its contents: a GGUF (named .gguf
    or starting with its magic; quantized tensors dequantized to float32), else safetensors (fp8
    weights read as float32, times their scale_weight)."""
    if gguf.is_gguf(path):
        return gguf.GGUFSource(path, GGUF_ARCHITECTURES)
    return fp8.dequantized(TensorSource(path))


def read_table(path: str, config: FluxConfig | None = None) -> CheckpointTable:
    """A diffusers transformer folder (config.json + safetensors) or a BFL single file
    (.safetensors in bf16/fp32/fp8, or .gguf; `single_file`), its config inferred from its shapes
    unless `config` is given: its config, tensors and table."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise CheckpointError(f"{path}: a transformer folder needs config.json (diffusers layout)")
        cfg = config or FluxConfig.from_hf_config(path)
        return CheckpointTable(cfg, TensorSource(path), diffusers_rules(cfg))
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file or folder")
    tensors = single_file(path)
    cfg = config or config_from_bfl(tensors)
    return CheckpointTable(cfg, tensors, bfl_rules(cfg), BFL_PREFIXES)
