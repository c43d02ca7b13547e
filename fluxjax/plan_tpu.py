"""The TPU compiler's own figures for fluxjax's denoising step, from any host (`fluxjax plan --topology`).

libtpu (the `tpu` extra: pip install "fluxjax[tpu]") describes a TPU topology without the hardware:
`jax.experimental.topologies.get_topology_desc("v5e:2x4", "tpu")` gives its devices, and a program
lowered with shardings over them compiles for that target on this host (MaxText's AOT
train_compile works so). The step is the one `plan_xla.step_program` builds, traced under the
strategy's mesh of TPU devices, so "auto" attention resolves for the TPU (splash, a Mosaic kernel:
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


def compile_step(model: str, strategy, devices: list, batch: int, l_img: int, l_txt: int, dtype: str = "bfloat16",
                 attention: str = "auto") -> dict[str, Any]:
    """Compile one denoise step of `model` for `devices` (a TPU topology's) under `strategy`.

    Returns per device: compiled {argument_bytes, temp_bytes, output_bytes, total_bytes, hbm_bytes,
    fits, compile_s}, collectives {kind: {count, bytes}}, attention (what "auto" resolved to in the
    trace and how many Mosaic kernels the program holds; a scanned body counts once). When the
    step does not fit, the TPU compiler refuses it; its figures come from its message.
    """
    import jax
    import jax.numpy as jnp

    from fluxjax import plan_xla
    from fluxjax.models import layers

    mesh = strategy.make_mesh(devices)
    step, args = plan_xla.step_program(model, strategy, mesh, batch, l_img, l_txt, jnp.dtype(dtype), attention)
    kind = devices[0].device_kind
    hbm = HBM_BYTES.get(kind)
    start = time.perf_counter()
    with strategy.activate(mesh):
        resolved = attention if attention != "auto" else layers.auto_implementation(
            jnp.dtype(dtype), 0, l_img + l_txt, masked=False)
        lowered = step.lower(*args)
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:
            refused = re.search(r"RESOURCE_EXHAUSTED.*?\(([0-9.]+)([GMK])\) exceeds available HBM \(([0-9.]+)([GMK])\)",
                                str(e), re.S)
            if not refused:
                raise
            unit = {"G": 1 << 30, "M": 1 << 20, "K": 1 << 10}
            need, hbm = (int(float(refused.group(i)) * unit[refused.group(i + 1)]) for i in (1, 3))
            return dict(device_kind=kind, attention=resolved, mosaic_kernels=None, collectives={},
                        compiled=dict(argument_bytes=None, temp_bytes=need, output_bytes=None, total_bytes=None,
                                      hbm_bytes=hbm, fits=False, compile_s=time.perf_counter() - start,
                                      refused=str(e).splitlines()[0][:300]))
    seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()
    hlo = compiled.as_text()
    total = (stats.argument_size_in_bytes + stats.temp_size_in_bytes + stats.output_size_in_bytes
             - stats.alias_size_in_bytes)
    return dict(device_kind=kind, attention=resolved, mosaic_kernels=hlo.count("tpu_custom_call"),
                collectives=collectives(hlo),
                compiled=dict(argument_bytes=int(stats.argument_size_in_bytes), temp_bytes=int(stats.temp_size_in_bytes),
                              output_bytes=int(stats.output_size_in_bytes), total_bytes=int(total), hbm_bytes=hbm,
                              fits=None if hbm is None else bool(total <= hbm), compile_s=seconds))
