"""Where a traced program runs: the platform, device kind and mesh split that attention's
"auto" choice (fluxjax/models/attention.py) and splash's per-shard call (splash.py) read."""

from __future__ import annotations

import math

import jax


def partitioned_size() -> int:
    """Devices of the trace's abstract mesh over its automatic axes (0 without a mesh): the split
    the SPMD partitioner still makes. Inside a shard_map the manual axes are already per device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 0
    manual = set(getattr(mesh, "manual_axes", ()))
    return math.prod(size for name, size in mesh.shape.items() if name not in manual)


def target_facts() -> dict:
    """backend, device_kind and compute_capability of the platform the traced program is for.

    Under a mesh, its devices' platform: a program traced under a mesh of TPU devices from a
    topology description (`fluxjax plan --topology`) targets a TPU although this process runs
    on a CPU. Without a mesh, this process's default backend and its first device.
    """
    mesh = jax.sharding.get_abstract_mesh()
    device = getattr(mesh, "abstract_device", None) if not mesh.empty else None
    if device is not None and getattr(device, "platform", None):
        here = device_facts()
        same = here["backend"] == device.platform
        return dict(backend=device.platform, device_kind=device.device_kind,
                    compute_capability=here["compute_capability"] if same else None)
    return device_facts()


def device_facts(device=None) -> dict:
    """backend, device_kind and compute_capability of `device` (default: this process's first),
    as `resolve_attention` takes them."""
    device = jax.devices()[0] if device is None else device
    return dict(backend=device.platform, device_kind=device.device_kind,
                compute_capability=getattr(device, "compute_capability", None))
