"""Per-device memory of a sharding strategy, from abstract shapes only (no weights, no accelerator).

Three figures, each labelled with how it was obtained:
  parameters   exact: every leaf of `jax.eval_shape(model.init)` divided as the strategy's
               table divides it on the mesh (FLUX.1: transformer, T5-XXL, CLIP-L, VAE; FLUX.2:
               transformer, Qwen3 or Mistral text encoder, VAE; all resident, but where they do not
               fit in the given memory T5 and CLIP run on the host CPU, as the pipeline's
               residency="auto" places them: fluxjax/pipeline/residency.py), with the count the
               config's formula gives beside it (fluxjax/plan/counts.py).
  activations  of one denoise step, two sources:
    analytic   the tensors live at the peak of a transformer block (see `step_activations`),
               plus the one block of weights fsdp gathers at a time (`gathered_block_bytes`); for a
               TPU chip (`device_kind`) what its compiler holds instead: two gathered kernels
               (`tpu_gathered_bytes`) and on a v6e (a v5p: where a shard is no multiple of
               128 lanes) its re-laid-out weight stacks (`tpu_relayout_bytes`), docs/tpu.md;
    xla        the step AOT-compiled for the mesh on simulated CPU devices (fluxjax/plan/xla.py,
               a child process). The CPU backend computes bf16 matmuls in float32 and so holds
               float32 copies the accelerator never makes; the step is therefore compiled in
               float32 (where nothing is upcast) and scaled by the analytic bf16/float32 ratio.
The verdict uses parameters + the larger activation figure.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import subprocess
import sys
import types
from typing import Any

import jax
import jax.numpy as jnp

from fluxjax.config import FluxConfig
from fluxjax.errors import UsageError
from fluxjax.loading import registry
from fluxjax.models import qwen3, sequence_parallel
from fluxjax.parallel.strategies import BATCH_AXIS, Strategy
from fluxjax.pipeline.mistral_tokenizer import FLUX2_DEV_MAX_SEQUENCE_LENGTH
from fluxjax.pipeline.qwen3_tokenizer import KLEIN_MAX_SEQUENCE_LENGTH
from fluxjax.plan import counts
from fluxjax.pipeline import residency as residency_rules

# The T5 length of each FLUX.1 --model (its components are fluxjax.loading.registry.PRESETS[model]).
T5_LENGTHS = {"dev": 512, "schnell": 256, "tiny": 16}
# FLUX.2 --model names (diffusers' convert_flux2_to_diffusers.py's, as the Qwen3Config presets):
# each component's config preset. The text encoder is a models.qwen3.Qwen3Encoder (Qwen3-4B,
# Qwen3-8B; Mistral-Small-3.1's language model for [dev]), the VAE the FLUX.2 one.
FLUX2_PRESETS = {
    "klein-4b": dict(transformer="flux2-klein-4b", text_encoder="klein-4b", vae="flux2"),
    "klein-9b": dict(transformer="flux2-klein-9b", text_encoder="klein-9b", vae="flux2"),
    "flux2-dev": dict(transformer="flux2-dev", text_encoder="flux2-dev", vae="flux2"),
}
# The text tokens of each --model: T5's, or the FLUX.2 pipelines' max_sequence_length.
TEXT_LENGTHS = {**T5_LENGTHS, "klein-4b": KLEIN_MAX_SEQUENCE_LENGTH, "klein-9b": KLEIN_MAX_SEQUENCE_LENGTH,
                "flux2-dev": FLUX2_DEV_MAX_SEQUENCE_LENGTH}
GIB = 1 << 30
PATCH = 16  # pixels per side of one packed image token (VAE factor 8 x 2x2 packing)


def parse_bytes(text: str) -> int:
    """'16GiB', '16GB', '80G', '512MiB', or a plain number of bytes -> bytes."""
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40, "kb": 10**3, "mb": 10**6,
             "gb": 10**9, "tb": 10**12, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "b": 1, "": 1}
    s = text.strip().lower().replace(" ", "")
    number = s.rstrip("kmgtib")
    try:
        return int(float(number) * units[s[len(number):]])
    except (ValueError, KeyError):
        raise UsageError(f"--hbm {text!r}: expected a size such as 16GiB, 80GB or 512MiB") from None


def parse_size(text: str) -> tuple[int, int]:
    """'1024x768' (width x height) -> (height, width), both multiples of 16."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 1024x1024") from None
    if w <= 0 or h <= 0 or w % PATCH or h % PATCH:
        raise UsageError(f"--size {text!r}: width and height must be positive multiples of {PATCH}")
    return h, w


def check_model(model: str) -> None:
    """UsageError naming --model unless the planner knows it (TEXT_LENGTHS)."""
    if model not in TEXT_LENGTHS:
        raise UsageError(f"--model {model!r}: choose from {', '.join(TEXT_LENGTHS)}")


def component_presets(model: str) -> dict[str, str]:
    """{component: config preset} of `model` (FLUX.1: registry.PRESETS; FLUX.2: FLUX2_PRESETS)."""
    check_model(model)
    return FLUX2_PRESETS[model] if model in FLUX2_PRESETS else registry.PRESETS[model]


def transformer_config(model: str) -> FluxConfig:
    return FluxConfig.preset(component_presets(model)["transformer"])


def build_component(name: str, preset: str, dtype: Any, **options):
    """The linen module of component `name` at config `preset`, parameters and compute in `dtype`:
    the registry's components with the `options` each takes (ComponentSpec.select), and FLUX.2's
    text encoder, a Qwen3Encoder (it takes none)."""
    dt = jnp.dtype(dtype)
    if name == "text_encoder":
        return qwen3.Qwen3Encoder(qwen3.Qwen3Config.preset(preset), dtype=dt, param_dtype=dt)
    spec = registry.COMPONENTS[name]
    return registry.build(name, spec.config.preset(preset), dt, **spec.select(options))


def component_shapes(name: str, model) -> Any:
    """The boxed abstract parameter tree of a `build_component` module."""
    return qwen3.param_shapes(model) if name == "text_encoder" else registry.abstract_params(name, model)


def formula_count(name: str, model) -> int | None:
    """The parameter count fluxjax/plan/counts.py gives for a `build_component` module (None where
    it has no formula: T5, CLIP, the VAEs)."""
    if name == "transformer":
        return counts.transformer_count(model.config)
    return counts.text_encoder_count(model.config) if name == "text_encoder" else None


def abstract_params(model: str, dtype: Any, quantize: str | None = None) -> dict[str, Any]:
    """Boxed abstract parameter trees (stacked layout) of `model`'s components, parameters in `dtype`
    (the Linears of the components that take `quantize` in its dtype and float32 scales). Cached:
    a table of plans (`fluxjax bench tpu`) asks for the same trees once per row."""
    return dict(_abstract_params(model, jnp.dtype(dtype).name, quantize))


@functools.lru_cache(maxsize=8)
def _abstract_params(model: str, dtype: str, quantize: str | None) -> dict[str, Any]:
    """abstract_params, cached: tracing dev's four components takes seconds, and a plan is often
    made for several strategies or memories (the trees are immutable shapes)."""
    return {name: component_shapes(name, build_component(name, preset, dtype, quantize=quantize))
            for name, preset in component_presets(model).items()}


@dataclasses.dataclass(frozen=True)
class ParamMemory:
    """One component's parameters: count, bytes in all, bytes on each device, replicated dims."""

    count: int
    total_bytes: int
    device_bytes: int
    notes: tuple[str, ...]
    formula_count: int | None = None  # fluxjax/plan/counts.py's count from the config (None: no formula)


def param_memory(abstract: Any, strategy: Strategy, mesh_shape: dict[str, int]) -> ParamMemory:
    """Exact parameter bytes per device: each leaf's bytes over the product of its split factors.

    Every split divides its dim (sharding.Strategy.spec takes a fallback or replicates a dim
    otherwise), so every device holds the same number of bytes.
    """
    mesh = types.SimpleNamespace(shape=mesh_shape)
    specs, notes = strategy.param_specs(abstract, mesh)
    boxes = jax.tree.leaves(abstract, is_leaf=lambda x: hasattr(x, "names"))
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    count = total = device = 0
    for box, spec in zip(boxes, flat_specs):
        value = getattr(box, "value", box)
        n, size = math.prod(value.shape), jnp.dtype(value.dtype).itemsize
        split = math.prod(mesh_shape[a] for dim in spec if dim for a in ((dim,) if isinstance(dim, str) else dim))
        count, total, device = count + n, total + n * size, device + n * size // split
    return ParamMemory(count, total, device, tuple(notes))


def step_activations(cfg: FluxConfig, batch: int, l_img: int, l_txt: int, heads_split: int, act_bytes: int,
                     seq_split: int = 1, seq_method: str | None = None, attention: str = "xla") -> int:
    """Analytic peak bytes of one transformer step on one device (inference, no gradients).

    batch: images on this device; heads_split: ways the heads and MLP features are split (tp);
    seq_split, seq_method: ways the tokens are split and how attention sees them ("ulysses",
    "ring" or None; models/sequence_parallel.py). With n = seq_split, L = l_txt + l_img padded
    to a multiple of n and c = L/n the tokens a device holds outside attention.
    The peak is inside a single-stream block, one of two moments (M = mlp_hidden_dim, U =
    mlp_up_dim: M under GELU, 2M under FLUX.2's SwiGLU, whose linear1 gives gate and value):
      attention:  x (B,c,D) + linear1 output (B,c,3D+U)/t + q,k,v (3 B,c,D/t) + the logits
                  and probabilities of XLA attention (not flash), float32 + act_bytes each:
                    no split  (B,H/t,L,L)
                    ulysses   (B,H/n,L,L), plus q,k,v again after the all-to-all (3 B,c,D)
                    ring      (B,H/t,c,c) of one hop, plus the k,v block in flight (2 B,c,D/t)
                              and the float32 accumulator (B,c,D/t)
      projection: x + linear1 output + attention out (B,c,D/t) + GELU or silu(gate) * value
                  (B,c,M/t) + their concat
    plus the step's inputs that stay live (latents, text features: whole on every device of the
    sequence axis; RoPE tables in float32, split) and one float32 LayerNorm temporary (B,c,D).
    A double-stream block holds less (its MLP is narrower than linear1). Activations in
    `act_bytes` per element; t = heads_split.
    attention: "xla" holds the logits as above; a flash kernel ("splash", "cudnn") holds one
    tile of them at a time (a few MiB in on-chip memory), so the logits term is left out and
    the attention output counted instead: (B,c,D/t), or under Ulysses (B,L,D/n) per device; the
    ring runs each hop's block through the kernel, so its (c, c) logits go too.
    """
    d, m, h, t, s, n = cfg.hidden_size, cfg.mlp_hidden_dim, cfg.num_heads, heads_split, act_bytes, seq_split
    b = batch
    seq = -(-(l_img + l_txt) // n) * n
    c = seq // n
    x = b * c * d * s
    linear1 = b * c * (3 * d + cfg.mlp_up_dim) * s // t
    qkv = 3 * b * c * d * s // t
    if seq_method == "ulysses" and attention in ("splash", "cudnn"):  # the kernel runs per device on H/n heads
        attn = 2 * qkv + b * seq * d * s // n
    elif seq_method == "ulysses":
        attn = 2 * qkv + b * -(-h // n) * seq * seq * (4 + s)
    elif seq_method == "ring":  # a flash kernel holds no (c, c) logits of the hop's block
        logits = 0 if attention in ("splash", "cudnn") else b * -(-h // t) * c * c * (4 + s)
        attn = qkv + 2 * b * c * d * s // t + b * c * d * 4 // t + logits
    elif attention in ("splash", "cudnn"):
        attn = qkv + b * c * d * s // t
    else:
        attn = qkv + b * -(-h // t) * seq * seq * (4 + s)
    projection = b * c * (d + m) * s * 2 // t
    inputs = b * (l_img * cfg.in_channels + l_txt * cfg.context_in_dim) * s + 2 * b * c * (d // h // 2) * 4
    layer_norm = b * c * d * 4
    return x + linear1 + max(attn, projection) + inputs + layer_norm


def sequence_traffic(cfg: FluxConfig, batch: int, l_img: int, l_txt: int, seq_split: int, seq_method: str,
                     act_bytes: int) -> int:
    """Analytic bytes one device sends for attention in one transformer step (every block once).

    Per attention call, with n = seq_split, c = L/n tokens per device (L padded to a multiple
    of n) and D = hidden_size:
      ulysses  four all-to-alls (q, k, v to the head split; the output back), each sending the
               (n-1)/n of a device's (B,c,D) tensor that other devices hold: 4 (n-1)/n B c D
      ring     n-1 hops, each passing one k and one v block on: 2 (n-1) B c D
    times depth + depth_single_blocks attention calls, in `act_bytes` per element. It leaves
    out the reshuffles XLA adds where a double block joins text and image tokens (of the order
    of one (B,c,D) tensor per block).
    """
    n = seq_split
    c = -(-(l_img + l_txt) // n)
    block = batch * c * cfg.hidden_size * act_bytes
    per_call = 4 * (n - 1) * block // n if seq_method == "ulysses" else 2 * (n - 1) * block
    return per_call * (cfg.depth + cfg.depth_single_blocks)


SP_SIZES = (1024, 2048, 4096)  # square image sizes `fluxjax plan` tabulates for sequence parallelism


@dataclasses.dataclass(frozen=True)
class SequenceRow:
    """One line of the sequence-parallel table: per device, one image, one step."""

    method: str
    degree: int
    size: int
    activation_bytes: int | None  # None: the degree does not divide the heads (Ulysses)
    traffic_bytes: int | None


def sequence_table(cfg: FluxConfig, method: str, devices: int, l_txt: int, act_bytes: int) -> tuple[SequenceRow, ...]:
    """Activations and traffic of one image's step for every degree dividing `devices` (1 = no
    split, as under dp) at the SP_SIZES square sizes; see step_activations, sequence_traffic."""
    rows = []
    for degree in (n for n in range(1, devices + 1) if devices % n == 0):
        for size in SP_SIZES:
            l_img = (size // PATCH) ** 2
            if method == "ulysses" and cfg.num_heads % degree:
                rows.append(SequenceRow(method, degree, size, None, None))
                continue
            split = dict(seq_split=degree, seq_method=method if degree > 1 else None)
            rows.append(SequenceRow(method, degree, size, step_activations(cfg, 1, l_img, l_txt, 1, act_bytes, **split),
                                    sequence_traffic(cfg, 1, l_img, l_txt, degree, method, act_bytes)))
    return tuple(rows)


def gathered_block_bytes(abstract_flux: Any, strategy: Strategy, mesh_shape: dict[str, int]) -> int:
    """Bytes of the largest transformer block's weights as a device holds them while using them.

    Weights split over the batch axes (fsdp) are all-gathered one block at a time before use;
    splits over other axes (tp) stay. So: one layer of the stack, with the batch axes dropped
    from the table.
    """
    batch_axes = set(strategy.mesh_axes(BATCH_AXIS))
    table = tuple((logical, axes) for logical, axes in strategy.table if not batch_axes & set(axes))
    gathering = dataclasses.replace(strategy, table=table)
    per_layer = []
    for stack in ("double_blocks", "single_blocks"):
        tree = abstract_flux[stack]
        depth = jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "names"))[0].value.shape[0]
        per_layer.append(param_memory(tree, gathering, mesh_shape).device_bytes // depth)
    return max(per_layer)


def _kernels(tree: Any) -> dict[str, Any]:
    """{path: boxed leaf} of the kernels (2D weights per layer) of one stacked block tree."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "names"))[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): box for path, box in leaves
            if path and str(getattr(path[-1], "key", path[-1])) == "kernel"}


def _layer_bytes(box: Any, strategy: Strategy, mesh_shape: dict[str, int]) -> int:
    """Bytes of one layer of a stacked kernel as a device holds it under `strategy`."""
    return param_memory({"k": box}, strategy, mesh_shape).device_bytes // box.value.shape[0]


def tpu_gathered_bytes(abstract_flux: Any, strategy: Strategy, mesh_shape: dict[str, int]) -> int:
    """What the TPU compiler holds of the weights fsdp gathers: twice the largest kernel of a layer,
    gathered (the one a matmul uses and the next, gathered while it runs); 0 when the batch axes
    split no weight (nothing is gathered: each layer's slice of the stack is read in place).

    The compiled programs (docs/tpu.md) never hold a whole block's weights, `gathered_block_bytes`:
    most matmuls circulate the weight shards around the ring (collective-permutes, a shard or
    two per direction in flight) and the rest all-gather one kernel just before its matmul.
    """
    batch_axes = set(strategy.mesh_axes(BATCH_AXIS))
    if math.prod(mesh_shape[a] for a in batch_axes) == 1:
        return 0
    table = tuple((logical, axes) for logical, axes in strategy.table if not batch_axes & set(axes))
    gathering = dataclasses.replace(strategy, table=table)
    split = [_layer_bytes(box, strategy, mesh_shape) < _layer_bytes(box, gathering, mesh_shape)
             for stack in ("double_blocks", "single_blocks") for box in _kernels(abstract_flux[stack]).values()]
    if not any(split):
        return 0
    return 2 * max(_layer_bytes(box, gathering, mesh_shape)
                   for stack in ("double_blocks", "single_blocks") for box in _kernels(abstract_flux[stack]).values())


# The kernels that project back to the model width (input: MLP features, output: embed): linear2 of
# the single blocks, the second MLP layer of each stream of the double blocks.
DOWN_PROJECTIONS = ("single_blocks/linear2/kernel", "double_blocks/img_mlp/2/kernel", "double_blocks/txt_mlp/2/kernel")


def tpu_relayout_bytes(abstract_flux: Any, strategy: Strategy, mesh_shape: dict[str, int], device_kind: str) -> int:
    """Bytes the TPU compiler adds for a layout change of whole weight stacks, per device.

    On a v6e ("TPU v6 lite"), when the mesh has one axis of more than one device and it splits
    the down projections (fsdp, or tp alone), the compiled step holds a copy of each of their
    stacks (every layer, as the device holds them) in another tiled layout, made once before the
    layer loop (measured at dev 1024 on v6e:2x4, HLO buffer assignment: tp 770 MiB, these three
    stacks; fsdp 641 MiB, linear2, one stream's MLP and one attention output projection). On a
    mesh of two such axes the same compiles hold none: split over both (fsdp_tp), or over fsdp
    and replicated over seq (sp_ring_fsdp, sp_ulysses_fsdp 4 x 2: 0.25 GiB of temporaries in all,
    no stack among them). Nor do v5e and v5p compiles of these programs, nor a v6e's when the
    weights are whole (one chip, dp, sp).
    """
    if sum(n > 1 for n in mesh_shape.values()) != 1:
        return 0
    if device_kind == "TPU v5":
        return _padded_minor_copies(abstract_flux, strategy, mesh_shape)
    if device_kind != "TPU v6 lite":
        return 0
    mesh = types.SimpleNamespace(shape=mesh_shape)
    total = 0
    for path in DOWN_PROJECTIONS:
        stack, rest = path.split("/", 1)
        box = _kernels(abstract_flux[stack])[rest]
        spec = jax.tree.leaves(strategy.param_specs({"k": box}, mesh)[0],
                               is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]
        axes = [a for dim in spec if dim for a in ((dim,) if isinstance(dim, str) else dim) if mesh_shape[a] > 1]
        if axes:
            total += param_memory({"k": box}, strategy, mesh_shape).device_bytes
    return total


LANES = 128  # the minor dimension of a TPU memory tile (the T(8,128) layouts of the HLO dumps)


def _padded_minor_copies(abstract_flux: Any, strategy: Strategy, mesh_shape: dict[str, int]) -> int:
    """Bytes of the kernel stacks a v5p ("TPU v5") compile copies into a layout with a lane-padded
    minor dimension, per device.

    A kernel whose last dimension (the output: embed for linear2, the MLPs' second layers and the
    attention output projections) is split to a shard that is not a multiple of LANES is passed in
    with its input dimension minor (no padding), and the layer loop reads a copy of the whole
    stack with the shard minor, padded to LANES: dev fsdp on v5p:4x4x4 (64 chips, shard 48) holds
    linear2 as bf16[38,15360,48] {1,2,0} in its arguments and a {2,1,0:T(8,128)} copy of 149 MB,
    0.28 GiB for the five stacks. With shards of 768 (v5p:2x2x1) the layout needs no padding and
    the compile holds no copy; v5e compiles at shard 12 (v5e:16x16) keep one layout and none.
    """
    mesh = types.SimpleNamespace(shape=mesh_shape)
    total = 0
    for stack in ("double_blocks", "single_blocks"):
        for box in _kernels(abstract_flux[stack]).values():
            value = box.value
            spec = jax.tree.leaves(strategy.param_specs({"k": box}, mesh)[0],
                                   is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]
            dims = tuple(spec) + (None,) * (value.ndim - len(spec))
            splits = [math.prod(mesh_shape[a] for a in ((d,) if isinstance(d, str) else d)) if d else 1 for d in dims]
            shard = value.shape[-1] // splits[-1]
            if splits[-1] > 1 and shard % LANES:
                rest = math.prod(n // k for n, k in zip(value.shape[:-1], splits[:-1]))
                total += rest * -(-shard // LANES) * LANES * jnp.dtype(value.dtype).itemsize
    return total


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything `fluxjax plan` prints; bytes are per device unless named total."""

    model: str
    strategy: str
    mesh_shape: dict[str, int]
    devices: int
    height: int
    width: int
    batch: int
    padded_batch: int
    dtype: str
    params: dict[str, ParamMemory]
    analytic_bytes: int  # step_activations + gathered_bytes + relayout_bytes
    gathered_bytes: int  # gathered_block_bytes, or on a TPU tpu_gathered_bytes
    xla: dict[str, Any] | None  # temp bytes and compile seconds from plan_xla, or None
    hbm: int | None
    seq_method: str | None = None  # "ulysses" / "ring" under a sequence-parallel strategy
    seq_split: int = 1
    seq_traffic_bytes: int = 0  # sequence_traffic: attention's bytes sent per device per step
    sequence: tuple[SequenceRow, ...] = ()  # sequence_table for the strategy's method
    quantize: str | None = None  # the Linears' weight quantization ("int8", "fp8"), as in params
    residency: str = "device"  # where T5 and CLIP run: "host" where they do not fit in `hbm` (residency.decide)
    residency_note: str | None = None  # the one line the pipeline says then
    relayout_bytes: int = 0  # tpu_relayout_bytes: stacks of weights the TPU compiler copies

    @property
    def on_device(self) -> dict[str, ParamMemory]:
        """The components a device holds: all, or all but the text encoders when they run on the host."""
        return {name: p for name, p in self.params.items()
                if self.residency == "device" or name not in residency_rules.ENCODERS}

    @property
    def param_bytes(self) -> int:
        return sum(p.device_bytes for p in self.on_device.values())

    @property
    def activation_bytes(self) -> int:
        return max(self.analytic_bytes, self.xla["corrected_temp_bytes"] if self.xla else 0)

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.activation_bytes


def make_plan(model: str, strategy: Strategy, devices: int, height: int = 1024, width: int = 1024,
              batch: int | None = None, dtype: str = "bfloat16", hbm: int | None = None, xla: bool = True,
              attention: str = "xla", quantize: str | None = None, device_kind: str | None = None) -> Plan:
    """The memory plan of `model` (TEXT_LENGTHS: "dev", "schnell", "tiny"; FLUX.2 "klein-4b", "klein-9b",
    "flux2-dev") under `strategy` on `devices` devices.

    batch: images per step (default: the data size, one image per data shard). xla: also
    AOT-compile the step on `devices` simulated CPU devices in a child process (seconds for dev).
    attention: the implementation the step runs ("xla", or a flash kernel: "splash" on a TPU,
    "cudnn"), which decides whether the analytic figure holds the (B, H, L, L) logits.
    quantize: None, "int8" or "fp8": parameter bytes of the quantized pipeline (FluxPipeline's quantize).
    device_kind: the chip ("TPU v5 lite", "TPU v6 lite", "TPU v5", ...): on a TPU the weights fsdp
    gathers are counted as the TPU compiler holds them (tpu_gathered_bytes), and the stacks it
    copies into another layout are added (tpu_relayout_bytes); None: one gathered block (XLA on a
    GPU or CPU all-gathers a block's weights).
    """
    check_model(model)
    if quantize and model in FLUX2_PRESETS:
        raise UsageError(f"--quantize {quantize}: FLUX.2 pipelines load unquantized for now (Flux2Pipeline.from_pretrained)")
    dt = jnp.dtype(dtype)
    if dt not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32), jnp.dtype(jnp.float16)):
        raise UsageError(f"--dtype {dtype!r}: choose bfloat16, float16 or float32")
    if height % PATCH or width % PATCH:
        raise UsageError(f"size {width}x{height}: width and height must be multiples of {PATCH}")
    mesh_shape = strategy.mesh_shape(devices)
    data = math.prod(mesh_shape[a] for a in strategy.mesh_axes(BATCH_AXIS))
    batch = data if batch is None else batch
    if batch < 1:
        raise UsageError(f"--batch {batch}: must be at least 1")
    padded = -(-batch // data) * data
    cfg = transformer_config(model)
    built = {name: build_component(name, preset, dt, quantize=quantize) for name, preset in component_presets(model).items()}
    abstract = abstract_params(model, dt, quantize)
    params = {name: dataclasses.replace(param_memory(tree, strategy, mesh_shape), formula_count=formula_count(name, built[name]))
              for name, tree in abstract.items()}
    tpu = bool(device_kind) and device_kind.startswith("TPU")
    gathered = (tpu_gathered_bytes if tpu else gathered_block_bytes)(abstract["transformer"], strategy, mesh_shape)
    relayout = tpu_relayout_bytes(abstract["transformer"], strategy, mesh_shape, device_kind) if tpu else 0
    seq_axes = strategy.mesh_axes("activation_seq")
    method = sequence_parallel.method_of(seq_axes, strategy.mesh_axes("activation_heads"))
    seq_split = math.prod(mesh_shape[a] for a in seq_axes)
    # Ulysses' head split lives only inside attention (counted there), not on the MLP features.
    heads_split = 1 if method == "ulysses" else math.prod(mesh_shape[a] for a in strategy.mesh_axes("activation_heads"))
    split = dict(seq_split=seq_split, seq_method=method)
    l_img, l_txt = (height // PATCH) * (width // PATCH), TEXT_LENGTHS[model]
    analytic = step_activations(cfg, padded // data, l_img, l_txt, heads_split, dt.itemsize, **split,
                                attention=attention) + gathered + relayout
    table = sequence_table(cfg, method, seq_split * heads_split if method == "ring" else seq_split, l_txt, dt.itemsize) if method else ()
    traffic = sequence_traffic(cfg, padded // data, l_img, l_txt, seq_split, method, dt.itemsize) if method else 0
    measured = None
    if xla:
        measured = xla_step_memory(model, strategy, devices, padded, l_img, l_txt)
        ratio = analytic / (step_activations(cfg, padded // data, l_img, l_txt, heads_split, 4, **split)
                            + (gathered + relayout) * 4 // dt.itemsize)
        measured["corrected_temp_bytes"] = int(measured["temp_bytes"] * ratio)
    plan = Plan(model, strategy.name, mesh_shape, devices, height, width, batch, padded, dt.name, params,
                analytic, gathered, measured, hbm, method, seq_split, traffic, table, quantize, relayout_bytes=relayout)
    # The step's activations are the temporaries beside the parameters (the pipeline, without a
    # plan, keeps residency.RESERVE of the memory for them).
    where, note = _residency(model, params, hbm, plan.activation_bytes)
    return dataclasses.replace(plan, residency=where, residency_note=note)


def _residency(model: str, params: dict[str, "ParamMemory"], hbm: int | None, temporaries: int) -> tuple[str, str | None]:
    """residency.decide for `model`'s components; FLUX.2's text encoder stays on the device (its
    pipeline has no host residency yet: residency.ENCODERS are FLUX.1's T5 and CLIP)."""
    if model in FLUX2_PRESETS:
        return "device", None
    return residency_rules.decide("auto", device_param_bytes(params), hbm, temporaries)


def device_param_bytes(params: dict[str, ParamMemory]) -> dict[str, int]:
    """{component: its parameter bytes on one device}, as residency.decide weighs them."""
    return {name: p.device_bytes for name, p in params.items()}


def resident(plan: Plan, temporaries: dict[str, int], hbm: int | None) -> dict[str, Any]:
    """What one device holds while the pipeline runs, from compiled programs' temporaries
    ({program: bytes}, "encode" the text encoders'; `fluxjax plan --topology`) and its memory.

    The programs run one at a time, so a device holds the parameters of the components on it and
    the largest temporaries of the programs that run on it. residency.decide places T5 and CLIP
    as the pipeline's "auto" does, weighing every parameter and the largest temporaries of all
    programs against `hbm`; on the host, their parameters and the encode program leave the count.
    Returns residency ("device", "host"), note (the pipeline's one line, or None), param_bytes,
    largest_temp_bytes, total_bytes and fits (None without `hbm`).
    """
    where, note = _residency(plan.model, plan.params, hbm, max(temporaries.values()))
    held = dataclasses.replace(plan, residency=where)
    temps = max(v for k, v in temporaries.items() if where == "device" or k != "encode")
    total = held.param_bytes + temps
    return dict(residency=where, note=note, param_bytes=held.param_bytes, largest_temp_bytes=temps, total_bytes=total,
                fits=None if hbm is None else total <= hbm)


def xla_step_memory(model: str, strategy: Strategy, devices: int, batch: int, l_img: int, l_txt: int) -> dict[str, Any]:
    """Run fluxjax/plan/xla.py in a child process with `devices` simulated CPU devices.

    Returns its JSON: temp_bytes, argument_bytes (float32 compile), compile_s.
    """
    spec = dict(model=component_presets(model)["transformer"], strategy=dataclasses.asdict(strategy), batch=batch, l_img=l_img, l_txt=l_txt)
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # above fluxjax/
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "fluxjax.plan.xla", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"AOT compile of the step failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _gb(n: int) -> str:
    return f"{n / 1e9:8.3f} GB ({n / GIB:7.3f} GiB)"


def format_plan(plan: Plan) -> str:
    """The plan as the lines `fluxjax plan` prints."""
    mesh = " x ".join(f"{a}={n}" for a, n in plan.mesh_shape.items())
    lines = [
        f"model {plan.model}, {plan.dtype}{f', {plan.quantize} weights' if plan.quantize else ''}, "
        f"{plan.width}x{plan.height}, batch {plan.batch}"
        + (f" (padded to {plan.padded_batch})" if plan.padded_batch != plan.batch else "")
        + f"; strategy {plan.strategy} on {plan.devices} devices: mesh {mesh}",
        "per device:",
    ]
    for name, p in plan.params.items():
        formula = "" if p.formula_count is None else f"; config formula {p.formula_count:,}"
        lines.append(f"  params {name:<12}{_gb(p.device_bytes)}  of {p.total_bytes / 1e9:.3f} GB, "
                     f"{p.count:,} parameters  [exact: shapes / table{formula}]")
        lines += [f"      {n}" for n in p.notes]  # path: what did not divide, what the dim got instead
    held = "" if plan.residency == "device" else "; T5 and CLIP on the host CPU, as the pipeline's residency='auto' places them"
    lines.append(f"  params total      {_gb(plan.param_bytes)}  [exact{held}]")
    if plan.residency_note:
        lines.append(f"  residency         {plan.residency_note}")
    lines.append(f"  step activations  {_gb(plan.analytic_bytes)}  [analytic: peak of a single-stream block, XLA attention, "
                 f"+ {plan.gathered_bytes / 1e9:.3f} GB: one block's weights as the scan slices them, all-gathered under fsdp]")
    if plan.xla:
        x = plan.xla
        lines.append(f"  step activations  {_gb(x['corrected_temp_bytes'])}  [xla: CPU AOT compile in float32, "
                     f"temp {x['temp_bytes'] / 1e9:.3f} GB x analytic {plan.dtype}/float32; compiled in {x['compile_s']:.1f} s]")
    lines.append(f"  total             {_gb(plan.total_bytes)}  [params + larger activation figure]")
    if plan.seq_method:
        lines.append(f"  attention traffic {_gb(plan.seq_traffic_bytes)}  [analytic: sent per step, {plan.seq_method} "
                     f"over {plan.seq_split} devices]")
        lines += format_sequence_table(plan.sequence, plan.dtype)
    if plan.hbm:
        verdict = "fits" if plan.total_bytes <= plan.hbm else "does NOT fit"
        lines.append(f"{verdict} in {plan.hbm / GIB:.1f} GiB per device ({plan.total_bytes / plan.hbm:.0%} used)")
    return "\n".join(lines)


def format_sequence_table(rows: tuple[SequenceRow, ...], dtype: str) -> list[str]:
    """The lines of a sequence_table: per degree and size, activations and traffic of one step."""
    lines = [f"sequence parallel ({rows[0].method}), one image, {dtype}, per device and step "
             "[analytic: plan.step_activations, plan.sequence_traffic]:",
             "  degree      size    activations     traffic sent"]
    for r in rows:
        if r.activation_bytes is None:
            lines.append(f"  {r.degree:>6}  {r.size:>4}x{r.size:<4}  degree does not divide the heads")
        else:
            lines.append(f"  {r.degree:>6}  {r.size:>4}x{r.size:<4}  {r.activation_bytes / 1e9:9.3f} GB  "
                         f"{r.traffic_bytes / 1e9:9.3f} GB")
    return lines


# -- training (`fluxjax plan --train`) ------------------------------------------------------------


def saved_activations(cfg: FluxConfig, batch: int, l_img: int, l_txt: int, heads_split: int, act_bytes: int,
                      remat: bool, attention: str = "xla") -> int:
    """Analytic bytes a training step keeps from the forward for the backward, on one device.

    With L = l_img + l_txt tokens, D = hidden_size, M = mlp_hidden_dim, U = mlp_up_dim (M, or 2M
    for SwiGLU), H heads, t = heads_split, s = act_bytes, per image:
      single block  s L (2D + (3D+U)/t + 3D/t + M/t + (D+M)/t)  the modulated norm output and
                    the gated output (D each), linear1's output, q/k/v after norm and RoPE, the
                    GELU (SwiGLU) output, linear2's input
      double block  s L (4D + 3D/t + 3D/t + D/t + (U+M)/t)  per token of either stream: norm
                    outputs before attention and MLP, the proj and MLP outputs (D each), the
                    qkv output, q/k/v after norm and RoPE, attention's output, the MLP's hidden
                    before and after GELU (SwiGLU)
      attention     (H/t) L^2 (4 + s) per block: XLA attention's float32 softmax probabilities
                    (for the softmax's backward) and their cast to s (for the matmul's)
    Without remat every block's residuals are kept. With remat (nn.remat per block) only each
    block's input is kept (s L D, both streams together), and one block's residuals are
    recomputed at a time in the backward. Under a flash kernel (attention "splash" or "cudnn")
    the L^2 term is not kept: the kernel saves each query's float32 logsumexp, (H/t) L 4 bytes.
    """
    d, m, u, h, t, s = cfg.hidden_size, cfg.mlp_hidden_dim, cfg.mlp_up_dim, cfg.num_heads, heads_split, act_bytes
    seq = l_img + l_txt
    flash = attention in ("splash", "cudnn")
    attention = -(-h // t) * seq * (4 if flash else seq * (4 + s))
    single = s * seq * (2 * d + ((3 * d + u) + 3 * d + m + (d + m)) // t) + attention
    double = s * seq * (4 * d + (3 * d + 3 * d + d + u + m) // t) + attention
    blocks = cfg.depth + cfg.depth_single_blocks
    if remat:
        return batch * (blocks * s * seq * d + max(single, double))
    return batch * (cfg.depth * double + cfg.depth_single_blocks * single)


def lora_param_count(abstract_flux: Any, rank: int, targets: tuple[str, ...]) -> int:
    """Parameters of a LoRA of `rank` on `targets` (fluxjax.lora.trainable.new_adapters' a and b): for each
    adapted Linear (layers, in, out), layers * (in + out) * rank."""
    shapes = {"/".join(str(getattr(k, "key", k)) for k in path): getattr(box, "value", box).shape
              for path, box in jax.tree_util.tree_flatten_with_path(abstract_flux, is_leaf=lambda x: hasattr(x, "names"))[0]}
    count = 0
    for target in targets:
        *lead, in_dim, out_dim = shapes[f"{target}/kernel"]
        count += math.prod(lead) * (in_dim + out_dim) * rank
    return count


@functools.lru_cache(maxsize=4)
def _abstract_transformer(model: str, dtype: str) -> Any:
    """The boxed abstract transformer parameters of `model` in `dtype` (cached: every strategy's plan uses them)."""
    return registry.abstract_params("transformer", registry.build("transformer", transformer_config(model), jnp.dtype(dtype)))


@dataclasses.dataclass(frozen=True)
class TrainPlan:
    """Per-device bytes of one training step (fluxjax.training.trainer's Trainer, AdamW, no EMA)."""

    strategy: str
    mesh_shape: dict[str, int]
    lora_rank: int | None
    weights: int  # full: float32 master weights; LoRA: the frozen base in the compute dtype
    adapters: int  # LoRA: its float32 factors, replicated; 0 for full fine-tuning
    gradients: int  # float32, laid out like what trains
    optimizer: int  # Adam's two float32 moments, laid out like what trains
    gathered: int  # fsdp: one block's weights gathered and one block's gradient before its reduce-scatter
    activations: int  # saved_activations without remat + step_activations (the peak of one block)
    activations_remat: int  # the same with remat

    def total(self, remat: bool) -> int:
        fixed = self.weights + self.adapters + self.gradients + self.optimizer + self.gathered
        return fixed + (self.activations_remat if remat else self.activations)


def train_plan(model: str, strategy: Strategy, devices: int, height: int = 1024, width: int = 1024,
               batch: int | None = None, lora_rank: int | None = None, compute_dtype: str = "bfloat16",
               attention: str = "xla") -> TrainPlan:
    """The training step's memory of `model`'s transformer under `strategy` on `devices` devices.

    The text encoders and the VAE are not resident: training reads cached latents and text embeddings
    (fluxjax.training.data). batch: images per step (default one per data shard). Parameters, gradients
    and optimizer state are exact (shapes over the strategy's table, param_memory); activations
    are analytic (saved_activations, plus step_activations for the peak inside the block being
    differentiated).
    """
    if strategy.mesh_axes("activation_seq"):
        raise UsageError(f"plan --train: sequence-parallel strategy {strategy.name!r} is not planned for training")
    mesh_shape = strategy.mesh_shape(devices)
    data = math.prod(mesh_shape[a] for a in strategy.mesh_axes(BATCH_AXIS))
    per_device = -(-(data if batch is None else batch) // data)
    cfg = transformer_config(model)
    compute = jnp.dtype(compute_dtype)
    master, low = _abstract_transformer(model, "float32"), _abstract_transformer(model, compute.name)
    heads_split = math.prod(mesh_shape[a] for a in strategy.mesh_axes("activation_heads"))
    l_img, l_txt = (height // PATCH) * (width // PATCH), TEXT_LENGTHS[model]
    peak = step_activations(cfg, per_device, l_img, l_txt, heads_split, compute.itemsize, attention=attention)
    act = {remat: saved_activations(cfg, per_device, l_img, l_txt, heads_split, compute.itemsize, remat, attention)
           + peak for remat in (False, True)}
    gathered = gathered_block_bytes(low, strategy, mesh_shape)
    if lora_rank is None:
        trained = param_memory(master, strategy, mesh_shape).device_bytes
        # the backward also gathers a block's weights, and holds its whole gradient before the reduce-scatter
        return TrainPlan(strategy.name, mesh_shape, None, trained, 0, trained, 2 * trained,
                         2 * gathered + gathered_block_bytes(master, strategy, mesh_shape), act[False], act[True])
    from fluxjax.lora.trainable import DEFAULT_TRAIN_TARGETS

    adapters = 4 * lora_param_count(master, lora_rank, DEFAULT_TRAIN_TARGETS)
    return TrainPlan(strategy.name, mesh_shape, lora_rank, param_memory(low, strategy, mesh_shape).device_bytes,
                     adapters, adapters, 2 * adapters, 2 * gathered, act[False], act[True])


def format_train_plans(plans: list[TrainPlan], model: str, height: int, width: int, hbms: list[int]) -> str:
    """The table `fluxjax plan --train` prints: one row per strategy and kind of training."""
    gb = lambda n: f"{n / 1e9:8.2f}"  # noqa: E731
    head = (f"training step of {model} at {width}x{height}, one image per data shard, per device, GB "
            "[weights/gradients/optimizer: exact, shapes / table; gathered and activations: analytic, "
            "plan.saved_activations + plan.step_activations, XLA attention]")
    cols = "  strategy  mesh             training   weights adapters    grads  adam m+v gathered  act(remat) act(no remat)"
    verdict_cols = "".join(f"  {h / GIB:.0f}GiB remat/no" for h in hbms)
    lines = [head, cols + verdict_cols]
    for p in plans:
        mesh = "x".join(f"{a}={n}" for a, n in p.mesh_shape.items())
        kind = "full" if p.lora_rank is None else f"LoRA r{p.lora_rank}"
        row = (f"  {p.strategy:<9} {mesh:<16} {kind:<9}{gb(p.weights)} {gb(p.adapters)} {gb(p.gradients)} "
               f"{gb(p.optimizer)} {gb(p.gathered)}  {gb(p.activations_remat)}    {gb(p.activations)}")
        for h in hbms:
            fits = ["yes" if p.total(r) <= h else "no" for r in (True, False)]
            row += f"  {fits[0]:>8}/{fits[1]:<3}"
        lines.append(row)
    lines.append("  totals: weights + adapters + grads + adam + gathered + activations (with or without remat)")
    for p in plans:
        kind = "full" if p.lora_rank is None else f"LoRA r{p.lora_rank}"
        lines.append(f"  {p.strategy:<9} {kind:<9} remat {gb(p.total(True))}   no remat {gb(p.total(False))}")
    return "\n".join(lines)

