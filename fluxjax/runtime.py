"""The process runtime: the XLA flags fluxjax sets for itself, and JAX's compilation cache.

XLA flags: fluxjax sets its own on NVIDIA GPUs when the user has set no XLA_FLAGS.

Only flags with a measured gain go here (docs/performance.md has the figures and commands):
  --xla_gpu_enable_triton_gemm=false   cuBLAS instead of Triton for the GEMMs: FLUX.1-dev's
                                       1024x1024 step 2.9% faster on an H200 (issue 21's table).

A user's XLA_FLAGS, whatever it holds, is left exactly as it is (set it, even to "", to opt out).
XLA reads XLA_FLAGS when JAX starts its first backend, so this runs when fluxjax is imported:
a program that has already used a JAX device before importing fluxjax keeps the flags it had.

Compilation cache: JAX's persistent compilation cache, on by default for fluxjax pipelines.

A FLUX executable takes from seconds (CPU, tiny) to a minute (full size on a TPU) to compile;
with the cache a new process of the same shape starts at once. Where it lives:
* `FLUXJAX_COMPILATION_CACHE=/some/folder` moves it, `FLUXJAX_COMPILATION_CACHE=off` disables it;
* a cache folder the user already gave JAX (`jax_compilation_cache_dir`) is kept as it is;
* otherwise `$XDG_CACHE_HOME/fluxjax/xla` (default `~/.cache/fluxjax/xla`).

In a folder fluxjax chooses, every compilation is kept: JAX by default skips those that took under
1 s (`jax_persistent_cache_min_compile_time_secs`), which on a CPU or with a small model is all of
them, so the folder stayed empty. A threshold the user set for JAX (its environment variable) is kept.
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

CACHE_ENV = "FLUXJAX_COMPILATION_CACHE"
OFF = ("off", "0", "false", "no", "none")
MIN_COMPILE_TIME_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"


def cache_root() -> str:
    """`$XDG_CACHE_HOME/fluxjax` (default `~/.cache/fluxjax`): fluxjax's caches live under it."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fluxjax")


def default_cache_dir() -> str:
    return os.path.join(cache_root(), "xla")


def enable_compilation_cache() -> str | None:
    """Point JAX's persistent compilation cache at fluxjax's folder (see the module docstring).

    Returns the folder in use, or None when the cache is off.
    """
    import jax  # here, not at the top: importing fluxjax sets XLA_FLAGS before anything imports jax

    setting = os.environ.get(CACHE_ENV, "").strip()
    if setting.lower() in OFF and setting:
        return None
    if setting:
        folder = os.path.expanduser(setting)
    elif jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    else:
        folder = default_cache_dir()
    os.makedirs(folder, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", folder)
    if MIN_COMPILE_TIME_ENV not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return folder
