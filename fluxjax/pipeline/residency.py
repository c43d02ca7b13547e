"""Where the text encoders live: on the devices beside the transformer, or on the host's CPU.

FLUX.1-dev with int8 weights on one 16 GB chip (TPU v5e, docs/quantization.md): the transformer is
11.2 GiB, T5-XXL and CLIP 4.8 GiB; together they exceed the chip's 15.75 GiB before any
temporaries, while the transformer's step alone fits. The encoders run once per call, before
denoising, on a few hundred tokens: where they do not fit beside the transformer they are placed
in host memory on JAX's CPU backend (present beside a TPU or GPU backend) and run there, their
outputs (B, L, 4096) and (B, 768) sent to the devices. Nothing of theirs then occupies device
memory at any point, so the devices' peak is the transformer's (and the VAE's) own.

The alternative, parameters parked in host memory and copied to the device for each call's
encoding, does not help there: during that copy the transformer is resident too, and the two
together are what does not fit. The CPU's encoding is slower (seconds for T5-XXL on a few
cores, once per call, not per step) and gives the same numbers (tests/multidevice/test_residency.py).

`decide` is the one rule: the pipeline applies it at load time (`FluxPipeline.from_pretrained`'s
`residency`), `fluxjax plan` to say what a device will hold (fluxjax/plan/planner.py).
"""

from __future__ import annotations

import contextlib
from typing import Mapping

import jax
import numpy as np
from jax.sharding import Mesh

from fluxjax.errors import UsageError
from fluxjax.loading.registry import host_device

MODES = ("auto", "device", "host")
ENCODERS = ("t5", "clip")  # the components `residency` moves
LABELS = {"vae": "VAE"}  # components as the one line names them
GIB = 1 << 30
# With no compiled program to measure, a device keeps this fraction of its memory for the
# programs' temporaries: dev with int8 weights at 1024x1024, batch 1, on one v5e chip takes 1.41
# GiB in the denoising step and 1.77 GiB in the VAE decode (docs/quantization.md), 9% and 11% of
# its 15.75 GiB; an eighth (1.97 GiB) covers both.
RESERVE = 1 / 8


class ResidencyWarning(UserWarning):
    """The text encoders were placed on the host CPU ("auto"): the one line says why."""


def check_residency(residency: str) -> str:
    """`residency` if it is one of MODES, else a one-line UsageError."""
    if residency not in MODES:
        raise UsageError(f"residency={residency!r}: choose auto (the text encoders leave the devices when they do not "
                         "fit beside the transformer), device or host")
    return residency


def memory_limit(device) -> int | None:
    """The bytes `device` can allocate (`memory_stats()["bytes_limit"]`: the TPU's usable HBM, the
    GPU's share XLA's allocator takes), None where the backend tells none (the CPU). Only a
    process's own devices report memory: for another process's device (a multi-host mesh's first
    device) this process's first device of the same platform answers (one job's chips are alike)."""
    if device.process_index != jax.process_index():
        device = next(d for d in jax.local_devices() if d.platform == device.platform)
    stats = device.memory_stats()
    return None if not stats or "bytes_limit" not in stats else int(stats["bytes_limit"])


def decide(residency: str, device_bytes: Mapping[str, int], limit: int | None,
           temporaries: int | None = None) -> tuple[str, str | None]:
    """("device" or "host", the one line saying why, or None) for the text encoders.

    residency: "auto" decides; "device" and "host" are taken as given (no line). device_bytes:
    the parameter bytes one device holds of each component ("transformer", "t5", "clip",
    "vae"); limit: a device's memory (None: unknown, so "device"); temporaries: the bytes the
    programs need beside the parameters (default: RESERVE of `limit`). "auto" chooses "host"
    when every component's parameters and the temporaries exceed the limit.
    """
    if residency != "auto":
        return residency, None
    if limit is None:
        return "device", None
    temporaries = int(limit * RESERVE) if temporaries is None else temporaries
    if sum(device_bytes.values()) + temporaries <= limit:
        return "device", None
    gib = lambda n: f"{n / GIB:.2f} GiB"  # noqa: E731
    encoders = sum(device_bytes.get(name, 0) for name in ENCODERS)
    others = " + ".join(f"{LABELS.get(name, name)} {gib(n)}" for name, n in device_bytes.items() if name not in ENCODERS)
    return "host", (f"text encoders run on the host CPU: {others} + T5/CLIP {gib(encoders)} of parameters and "
                    f"{gib(temporaries)} for temporaries exceed the {gib(limit)} of device memory "
                    "(residency='device' keeps them there)")


@contextlib.contextmanager
def on_host():
    """Trace and run on the host CPU device alone, inside a pipeline's strategy or not: a one-device
    mesh of it (so "auto" attention resolves for the CPU) and no logical axis rules."""
    import flax.linen as nn

    with jax.set_mesh(Mesh(np.array([host_device()]), ("host",))), nn.logical_axis_rules(()):
        yield
