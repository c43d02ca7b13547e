"""XLA flags fluxjax sets for itself on NVIDIA GPUs when the user has set no XLA_FLAGS.

Only flags with a measured gain go here (docs/performance.md has the figures and commands):
  --xla_gpu_enable_triton_gemm=false   cuBLAS instead of Triton for the GEMMs: FLUX.1-dev's
                                       1024x1024 step 2.9% faster on an H200 (issue 21's table).

A user's XLA_FLAGS, whatever it holds, is left exactly as it is (set it, even to "", to opt out).
XLA reads XLA_FLAGS when JAX starts its first backend, so this runs when fluxjax is imported:
a program that has already used a JAX device before importing fluxjax keeps the flags it had.
"""

from __future__ import annotations

import os
import pkgutil

GPU_FLAGS = ("--xla_gpu_enable_triton_gemm=false",)
APPLIED: str | None = None  # what apply_gpu_defaults set in this process, if anything


def cuda_plugin_installed() -> bool:
    """Whether a CUDA plugin for JAX is installed (a `jax_plugins.xla_cuda*` module), found
    without importing it or starting a backend."""
    try:
        import jax_plugins
    except ImportError:
        return False
    return any(m.name.startswith("xla_cuda") for m in pkgutil.iter_modules(jax_plugins.__path__))


def gpu_default_flags(environ, cuda_plugin: bool) -> str | None:
    """The XLA_FLAGS value to set, or None to leave the environment alone: GPU_FLAGS when
    XLA_FLAGS is unset, a CUDA plugin is installed, and JAX_PLATFORMS (when set) allows a GPU."""
    if "XLA_FLAGS" in environ or not cuda_plugin:
        return None
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms and not any(p.strip() in ("cuda", "gpu") for p in platforms.split(",")):
        return None
    return " ".join(GPU_FLAGS)


def apply_gpu_defaults(environ=os.environ) -> str | None:
    """Set XLA_FLAGS to `gpu_default_flags`' value where it gives one; returns what was set."""
    global APPLIED
    flags = gpu_default_flags(environ, cuda_plugin_installed())
    if flags is not None:
        environ["XLA_FLAGS"] = APPLIED = flags
    return flags
