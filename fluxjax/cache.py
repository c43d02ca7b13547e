"""JAX's persistent compilation cache, on by default for fluxjax pipelines.

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

import jax

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
