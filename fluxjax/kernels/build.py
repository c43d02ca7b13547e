"""Building, caching and registering fluxjax's CPU kernels (the .cc files of this folder).

Each kernel is compiled once per machine with the system C++ compiler (`$CXX`, else g++, c++
or clang++) for the host CPU (-march=native) and kept in `$FLUXJAX_KERNEL_CACHE` (default
`~/.cache/fluxjax/kernels`), under a name that hashes the sources, the flags, jaxlib's version
and the CPU model, so a home folder shared by different machines never hands one a binary
built for another. It is written under a temporary name and renamed: a crash leaves no
partial library.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jaxlib

from fluxjax.runtime import cache_root

FOLDER = Path(__file__).parent
CACHE_ENV = "FLUXJAX_KERNEL_CACHE"


class KernelUnavailable(RuntimeError):
    """A kernel could not be built or loaded on this machine; the message says why."""


def _flags() -> list[str]:
    flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", f"-I{jax.ffi.include_dir()}"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags.append("-mprefer-vector-width=512")  # GCC's default of 256 halves AVX-512 here
    return flags


def _cpu_identity() -> str:
    """Model name and feature flags of this CPU (what -march=native compiles for)."""
    try:
        with open("/proc/cpuinfo") as f:
            fields = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
        return "|".join(fields.get(k, "").strip() for k in ("model name", "flags", "Features", "CPU part"))
    except OSError:
        return f"{platform.machine()}|{platform.processor()}"


def _compiler() -> str:
    for name in filter(None, (os.environ.get("CXX"), "g++", "c++", "clang++")):
        path = shutil.which(name)
        if path:
            return path
    raise KernelUnavailable("no C++ compiler found (tried $CXX, g++, c++, clang++)")


def library_path(name: str, compiler: str) -> Path:
    """Where kernel `name` (name.cc) built by `compiler` for this jaxlib and CPU is, or will be."""
    key = hashlib.sha256()
    for part in ((FOLDER / f"{name}.cc").read_bytes(), (FOLDER / "simd.h").read_bytes(), " ".join(_flags()).encode(),
                 compiler.encode(), jaxlib.__version__.encode(), _cpu_identity().encode()):
        key.update(part)
    folder = Path(os.path.expanduser(os.environ.get(CACHE_ENV) or os.path.join(cache_root(), "kernels")))
    return folder / f"{name}-{key.hexdigest()[:16]}.so"


def build(name: str) -> Path:
    """Compile kernel `name` unless this machine's build is cached; returns the library's path.

    Raises KernelUnavailable, with the compiler's message, when it cannot be built.
    """
    compiler = _compiler()
    target = library_path(name, compiler)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=target.stem, suffix=".partial")
    os.close(fd)
    source = FOLDER / f"{name}.cc"
    try:
        run = subprocess.run([compiler, *_flags(), str(source), "-o", partial], capture_output=True, text=True)
        if run.returncode:
            raise KernelUnavailable(f"{compiler} failed on {source}:\n{run.stderr.strip()[-2000:]}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


@functools.lru_cache(maxsize=None)
def unavailable_reason(name: str, symbol: str, target: str) -> str | None:
    """None once kernel `name` is built, loaded and its handler `symbol` registered with XLA as
    FFI target `target` (at most once per process); otherwise why it could not be."""
    try:
        library = ctypes.cdll.LoadLibrary(str(build(name)))
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    except (KernelUnavailable, OSError, AttributeError) as error:
        return str(error)
    return None


def require(name: str, symbol: str, target: str) -> None:
    """Make sure the kernel is registered; raise KernelUnavailable (saying why) if it cannot be."""
    reason = unavailable_reason(name, symbol, target)
    if reason is not None:
        raise KernelUnavailable(reason)


def suits(name: str, symbol: str, target: str) -> bool:
    """Whether an "auto" choice takes this kernel: tracing for a CPU, no mesh of several devices
    (the SPMD partitioner cannot split a custom call), and the kernel builds. When it does not
    build, warn once per kernel saying why; the caller then uses XLA."""
    if jax.default_backend() != "cpu" or jax.sharding.get_abstract_mesh().size > 1:
        return False
    reason = unavailable_reason(name, symbol, target)
    if reason is not None:
        _warn_unavailable(name, reason)
    return reason is None


@functools.lru_cache(maxsize=None)
def _warn_unavailable(name: str, reason: str) -> None:
    warnings.warn(f"fluxjax's CPU kernel {name} is unavailable, so XLA's slower one is used: {reason}",
                  RuntimeWarning, stacklevel=4)
