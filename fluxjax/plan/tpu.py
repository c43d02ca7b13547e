"""The TPU compiler's own figures for fluxjax's denoising step, from any host (`fluxjax plan --topology`).

libtpu (the `tpu` extra: pip install "fluxjax[tpu]") describes a TPU topology without the hardware:
`jax.experimental.topologies.get_topology_desc("v5e:2x4", "tpu")` gives its devices, and a program
lowered with shardings over them compiles for that target on this host (MaxText's AOT
train_compile works so). The programs are the pipeline's own jitted functions (`program_inputs`),
traced under the strategy's mesh of TPU devices, so "auto" attention resolves for the TPU (splash, a Mosaic kernel:
`tpu_custom_call` in the compiled HLO) and the memory is what the TPU compiler allocates per chip.

The host backend is chosen explicitly (the CPU): with libtpu installed and no TPU attached, JAX
would otherwise probe for one at the first use of a device.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import re
import sys
import tempfile
import time
from typing import Any

from fluxjax.errors import UsageError

TPU_EXTRA = 'pip install "fluxjax[tpu]"'
# HBM per chip by device kind (public TPU specifications): a fallback when the compiler's answer
# does not name the limit; the compiler reports the usable part (v5e: 15.75 of 16 GiB).
HBM_BYTES = {"TPU v4": 32 << 30, "TPU v5 lite": 16 << 30, "TPU v5": 95 << 30, "TPU v6 lite": 32 << 30}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_TOPOLOGY = re.compile(r"^(v[0-9]+[a-z]*):([0-9]+(?:x[0-9]+){1,2})$")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8}


def use_host_cpu() -> None:
    """Run this process's own arrays on the CPU (before JAX picks a backend): AOT work for a TPU
    target needs no local accelerator, and with libtpu installed JAX would probe for one."""
    import jax

    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")


@contextlib.contextmanager
def _quiet_stderr():
    """libtpu prints several lines of warnings (no accelerator type, no worker hostnames) when it
    describes a topology on a host without TPUs: hold them back unless the call fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace")[-2000:])
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def topology_devices(name: str, slices: int = 1) -> list:
    """The devices of TPU topology `name` (libtpu's names: v5e:1x1, v5e:2x4, v6e:2x4, v5p:2x2x1,
    v5p:4x4x4, v5e:16x16, ...), `slices` of them joined over DCN (multislice)."""
    match = _TOPOLOGY.match(name)
    if not match:
        raise UsageError(f"--topology {name!r}: expected a TPU topology such as v5e:1x1, v5e:2x4, v6e:2x4 or v5p:2x2x1")
    if slices < 1:
        raise UsageError(f"--slices {slices}: must be at least 1")
    if importlib.util.find_spec("libtpu") is None:
        raise UsageError(f"--topology {name}: compiling for a TPU needs libtpu, which is not installed: {TPU_EXTRA}")
    use_host_cpu()
    # A topology description touches no chip, but libtpu takes a host-wide lock file on loading:
    # without this a second process (two plans at once) is refused.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    dims = [int(d) for d in match.group(2).split("x")]
    # A host holds at most 2x2 chips of these generations: a smaller topology is one host of its size.
    bounds = (min(dims[0], 2), min(dims[1], 2), 1)
    try:
        with _quiet_stderr():
            topology = topologies.get_topology_desc(topology_name=name, platform="tpu", chips_per_host_bounds=bounds,
                                                    num_slices=slices)
    except Exception as e:  # libtpu's own words say which part of the name it refused
        raise UsageError(f"--topology {name}: libtpu refused it: {str(e).splitlines()[0]}") from None
    return list(topology.devices)


def collectives(hlo: str) -> dict[str, dict[str, int]]:
    """{kind: {count, bytes}} of the collectives in compiled HLO text; bytes are each op's result
    (per device, as the SPMD program is per device), async pairs counted once at their start."""
    found: dict[str, dict[str, int]] = {}
    for line in hlo.splitlines():
        m = re.search(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
        if not m or "-done(" in line:
            continue
        entry = found.setdefault(m.group(2), {"count": 0, "bytes": 0})
        entry["count"] += 1
        shapes = re.findall(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]", m.group(1))
        result = shapes[-1:] if m.group(3) else shapes  # an async start's tuple ends with its result
        entry["bytes"] += sum(_DTYPE_BYTES.get(t, 4) * math.prod(int(d) for d in dims.split(",") if d)
                              for t, dims in result)
    return found


PROGRAMS = ("denoise", "encode", "decode", "vae_encode", "flowedit")
"""The pipeline's jitted programs `compile_programs` compiles: the denoising loop (sampling.denoise,
with the variant's conditioning), the prompt encoders (text.encode_prompts_jit: T5 and CLIP), the VAE
decode (pipeline.decode_packed), the VAE encode of img2img, inpainting, Kontext, Fill and Control
(conditioning.encode_packed) and FlowEdit's loop (flowedit.edit, one draw per step). For a FLUX.2
--model the same names are pipeline/flux2.py's programs (`_flux2_programs`: its Qwen3 or Mistral
encoder, the FLUX.2 VAE's token decode and encode; no FlowEdit)."""
VARIANTS = ("base", "kontext", "fill", "control")
# What each variant adds to the denoising loop's transformer input: (extra input channels, reference
# images). Fill concatenates masked-image latents (64) and the packed 8x8 mask (256) to the 64 latent
# features; Control the control image's latents (64); Kontext appends one reference image's tokens.
VARIANT_INPUTS = {"base": (0, 0), "kontext": (0, 1), "fill": (320, 0), "control": (64, 0)}


def program_inputs(model: str, strategy, mesh, batch: int, height: int, width: int, t5_length: int,
                   dtype: str = "bfloat16", attention: str = "auto", variant: str = "base",
                   quantize: str | None = None) -> dict[str, tuple]:
    """{program: (jitted function, args, kwargs)} of the pipeline's programs for `model`'s
    components, with abstract parameters laid out as `strategy` lays them on `mesh` and inputs
    batch-sharded as the pipeline places them: what the pipeline runs, without weights.
    variant: the checkpoint's kind (VARIANTS): its transformer's input width and the
    conditioning its denoising loop takes (a Kontext reference the size of the image).
    quantize: None, "int8" or "fp8", as FluxPipeline.from_pretrained takes it: the quantized
    Linears' parameters are then int8 (fp8) values and float32 scales."""
    import dataclasses

    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from fluxjax.pipeline import conditioning
    from fluxjax.sampling import flowedit
    from fluxjax.sampling import sampler as sampling
    from fluxjax.loading import registry
    from fluxjax.pipeline.pipeline import component_options, decode_packed
    from fluxjax.pipeline.text import CLIP_MAX_LENGTH, encode_prompts_jit
    from fluxjax.plan.planner import FLUX2_PRESETS, build_component, component_presets, component_shapes

    dt = jnp.dtype(dtype)
    shard = strategy.param_shardings(mesh)
    models, params = {}, {}
    for name, preset in component_presets(model).items():
        # FLUX.2's text encoder (not a registry component) takes no options
        options = component_options(name, attention, quantize) if name in registry.COMPONENTS else {}
        built = build_component(name, preset, dt, **options)
        if name == "transformer" and VARIANT_INPUTS[variant][0]:
            built = built.clone(config=dataclasses.replace(built.config,
                                                           in_channels=built.config.in_channels + VARIANT_INPUTS[variant][0]))
        boxed = component_shapes(name, built)
        models[name] = built
        params[name] = jax.tree.map(lambda b, sh: jax.ShapeDtypeStruct(b.value.shape, b.value.dtype, sharding=sh), boxed,
                                    shard(boxed), is_leaf=lambda x: isinstance(x, nn.Partitioned))

    def arg(*shape, dtype=jnp.float32):
        return jax.ShapeDtypeStruct((batch, *shape), dtype, sharding=strategy.batch_sharding(mesh, 1 + len(shape)))

    cfg = models["transformer"].config
    l_img = (height // 16) * (width // 16)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    guidance = arg() if cfg.guidance_embed else None
    if model in FLUX2_PRESETS:
        return _flux2_programs(models, params, arg, replicated, height, width, t5_length, dt)
    steps = 28 if cfg.guidance_embed else 4
    sigmas = jax.ShapeDtypeStruct((steps + 1,), jnp.float32, sharding=replicated)
    extra, references = VARIANT_INPUTS[variant]
    cond = sampling.Conditioning(
        channels=arg(l_img, extra) if extra else None,
        ref_img=arg(references * l_img, 64) if references else None,
        ref_ids=arg(references * l_img, 3) if references else None)
    txt, vec, txt_ids = arg(t5_length, cfg.context_in_dim, dtype=dt), arg(cfg.vec_in_dim, dtype=dt), arg(t5_length, 3)
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    programs = {
        "denoise": (sampling.denoise, (models["transformer"], params["transformer"], arg(l_img, 64), arg(l_img, 3),
                                       txt, txt_ids, vec, sigmas, guidance), dict(cond=cond)),
        "encode": (encode_prompts_jit, (models["t5"], params["t5"], models["clip"], params["clip"],
                                        arg(t5_length, dtype=jnp.int32), arg(CLIP_MAX_LENGTH, dtype=jnp.int32), dt), {}),
        "decode": (decode_packed, (models["vae"], params["vae"], arg(l_img, 64), height, width), {}),
        "vae_encode": (conditioning.encode_packed, (models["vae"], params["vae"], arg(height, width, 3)), {}),
    }
    if variant == "base":  # FlowEdit runs on plain text-to-image models (flowedit.check_variant)
        programs["flowedit"] = (flowedit.edit, (models["transformer"], params["transformer"], arg(l_img, 64),
                                                arg(l_img, 3), txt, vec, txt, vec, txt_ids, sigmas,
                                                arg(2, dtype=jnp.uint32), guidance, guidance, scalar, scalar, 1), {})
    return programs


def _flux2_programs(models: dict, params: dict, arg, replicated, height: int, width: int, text_length: int,
                    dtype) -> dict[str, tuple]:
    """program_inputs' programs of a FLUX.2 pipeline (pipeline/flux2.py): the denoising loop (no
    pooled vector, 4 id columns, the family's default steps: 4 for distilled klein, 50 for [dev]
    with its guidance), the stacked hidden states of the Qwen3 (Mistral) encoder, the VAE's token
    decode and encode (batch-norm normalisation, 2x2 patches). FlowEdit is FLUX.1's."""
    import jax
    import jax.numpy as jnp

    from fluxjax.pipeline import flux2
    from fluxjax.sampling import sampler as sampling

    cfg = models["transformer"].config
    family = flux2.FLUX2_DEV if cfg.guidance_embed else flux2.KLEIN
    steps = flux2.family_defaults(family, is_distilled=True).num_steps
    sigmas = jax.ShapeDtypeStruct((steps + 1,), jnp.float32, sharding=replicated)
    rows, cols = height // sampling.PIXELS_PER_TOKEN, width // sampling.PIXELS_PER_TOKEN
    ids = cfg.id_columns
    tokens = arg(rows * cols, cfg.in_channels)
    txt = arg(text_length, cfg.context_in_dim, dtype=dtype)
    return {
        "denoise": (sampling.denoise, (models["transformer"], params["transformer"], tokens, arg(rows * cols, ids),
                                       txt, arg(text_length, ids), None, sigmas, arg() if cfg.guidance_embed else None), {}),
        "encode": (flux2.encode_text, (models["text_encoder"], params["text_encoder"], arg(text_length, dtype=jnp.int32),
                                       arg(text_length, dtype=jnp.int32), family.layers, dtype), {}),
        "decode": (flux2.decode_tokens, (models["vae"], params["vae"], tokens, rows, cols), {}),
        "vae_encode": (flux2.encode_tokens, (models["vae"], params["vae"], arg(height, width, 3)), {}),
    }


def compile_programs(model: str, strategy, devices: list, batch: int, height: int, width: int, t5_length: int,
                     dtype: str = "bfloat16", attention: str = "auto", programs=PROGRAMS,
                     variant: str = "base", quantize: str | None = None) -> dict[str, dict]:
    """`compile_program` for each of `programs` (names in PROGRAMS) on `devices` under `strategy`
    (variant, quantize: as program_inputs); a program the variant does not run (FlowEdit on Fill,
    Control or Kontext) is left out."""
    mesh = strategy.make_mesh(devices)
    built = program_inputs(model, strategy, mesh, batch, height, width, t5_length, dtype, attention, variant, quantize)
    return {name: compile_program(strategy, mesh, *built[name]) for name in programs if name in built}


def compile_program(strategy, mesh, fn, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Compile `fn(*args, **kwargs)` (a `jit_with_rules` function, abstract arguments) for the
    devices of `mesh` under `strategy`, as the TPU compiler does on a TPU host.

    Returns per device: compiled {argument_bytes, temp_bytes, output_bytes, total_bytes, hbm_bytes,
    fits, compile_s}, collectives {kind: {count, bytes}}, mosaic_kernels (custom calls of Pallas
    kernels in the compiled HLO: a scanned body counts once). When the program does not fit, the
    TPU compiler refuses it; its figures come from its message (`refused`).
    """
    start = time.perf_counter()
    with strategy.activate(mesh):
        lowered = fn.lower(*args, **kwargs)
    return compile_lowered(lowered, mesh, start)


def compile_lowered(lowered, mesh, start: float | None = None) -> dict[str, Any]:
    """`compile_program`'s figures for a program already lowered for the devices of `mesh`;
    compile_s counts from `start` (default: now)."""
    import jax

    kind = mesh.devices.flat[0].device_kind
    hbm = HBM_BYTES.get(kind)
    start = time.perf_counter() if start is None else start
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        refused = re.search(r"RESOURCE_EXHAUSTED.*?\(([0-9.]+)([GMK])\) exceeds available HBM \(([0-9.]+)([GMK])\)",
                            str(e), re.S)
        if not refused:
            raise
        unit = {"G": 1 << 30, "M": 1 << 20, "K": 1 << 10}
        need, hbm = (int(float(refused.group(i)) * unit[refused.group(i + 1)]) for i in (1, 3))
        return dict(device_kind=kind, mosaic_kernels=None, collectives={},
                    compiled=dict(argument_bytes=None, temp_bytes=need, output_bytes=None, total_bytes=None,
                                  hbm_bytes=hbm, fits=False, compile_s=time.perf_counter() - start,
                                  refused=str(e).splitlines()[0][:300]))
    seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()
    hlo = compiled.as_text()
    total = (stats.argument_size_in_bytes + stats.temp_size_in_bytes + stats.output_size_in_bytes
             - stats.alias_size_in_bytes)
    return dict(device_kind=kind, mosaic_kernels=hlo.count("tpu_custom_call"), collectives=collectives(hlo),
                compiled=dict(argument_bytes=int(stats.argument_size_in_bytes), temp_bytes=int(stats.temp_size_in_bytes),
                              output_bytes=int(stats.output_size_in_bytes), total_bytes=int(total), hbm_bytes=hbm,
                              fits=None if hbm is None else bool(total <= hbm), compile_s=seconds))


def transformer_attention(strategy, devices: list, dtype: str = "bfloat16") -> str:
    """What "auto" attention resolves to for the transformer (unmasked) traced under `strategy`'s
    mesh of `devices`: the implementation the compiled denoising loop holds."""
    import jax.numpy as jnp

    from fluxjax.models.attention import auto_implementation

    mesh = strategy.make_mesh(devices)
    with strategy.activate(mesh):
        return auto_implementation(jnp.dtype(dtype), 128, 4096, masked=False)


def compile_train_step(model: str, strategy, devices: list, batch: int, height: int, width: int, t5_length: int,
                       lora_rank: int | None = None, remat: bool = False, compute_dtype: str = "bfloat16") -> dict:
    """`compile_program`'s figures for one training step of `model`'s transformer as `fluxjax train`
    runs it (fluxjax.training.trainer.Trainer: AdamW, float32 master weights, `compute_dtype` matmuls,
    `remat`; with `lora_rank` a new LoRA of that rank on the frozen base), on `devices` under
    `strategy`. The batch is cached latents and text embeddings (training keeps no encoder)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from fluxjax.sampling import sampler as sampling
    from fluxjax.config import FluxConfig
    from fluxjax.loading import registry
    from fluxjax.training.trainer import TrainConfig, Trainer

    mesh = strategy.make_mesh(devices)
    cfg = TrainConfig(remat=remat, lora_rank=lora_rank, compute_dtype=compute_dtype)
    flux = registry.build("transformer", FluxConfig.preset(registry.PRESETS[model]["transformer"]), jnp.float32,
                          attention_impl="auto")
    trainer = Trainer(flux, cfg, sampling.Schedule.dev(), strategy=strategy, mesh=mesh)
    boxed = registry.abstract_params("transformer", trainer.model)
    shapes = jax.tree.map(lambda b: jax.ShapeDtypeStruct(b.value.shape, jnp.dtype(cfg.param_dtype)), boxed,
                          is_leaf=lambda x: isinstance(x, nn.Partitioned))
    state = trainer.abstract_state(shapes)
    frozen = None
    if lora_rank is not None:  # the frozen base in the compute dtype, placed by the strategy; fixed leaves replicated
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        base = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, jnp.dtype(compute_dtype), sharding=sh), shapes,
                            trainer.param_shardings())
        fixed = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), trainer.fixed)
        frozen = (base, fixed)
    c = trainer.model.config
    l_img = (height // 16) * (width // 16)

    def arg(*shape, dtype=jnp.float32):
        return jax.ShapeDtypeStruct((batch, *shape), dtype, sharding=strategy.batch_sharding(mesh, 1 + len(shape)))

    data = dict(latents=arg(l_img, c.in_channels), img_ids=arg(l_img, 3), txt=arg(t5_length, c.context_in_dim),
                txt_ids=arg(t5_length, 3), vec=arg(c.vec_in_dim))
    start = time.perf_counter()
    return compile_lowered(trainer.lower_step(state, data, frozen), mesh, start)
