"""Start JAX's multi-process runtime when fluxjax runs as one of several processes.

Three ways, tried in order; with none of them this is a single process and nothing happens:
* `FLUXJAX_COORDINATOR=host:port`, `FLUXJAX_NUM_PROCESSES=N`, `FLUXJAX_PROCESS_ID=i`: explicit,
  for any launcher (on CPU the processes exchange collectives over gloo);
* a multi-process job of a launcher JAX detects itself (TPU pod slice on GKE, SLURM with more
  than one task, Open MPI with more than one rank): `jax.distributed.initialize()` with no
  arguments reads it all from the launcher;
* `FLUXJAX_DISTRIBUTED=auto` forces that automatic path (a TPU pod on plain GCE VMs, which JAX
  detects through the metadata server, not through the environment).

Detection reads only the environment: JAX's own probes would take mpi4py being installed for a
cluster, and must not run before `initialize` anyway, since any JAX computation first would
fix the process to a single-process backend.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import numpy as np

from fluxjax.errors import CheckpointError, UsageError

COORDINATOR_ENV = "FLUXJAX_COORDINATOR"
NUM_PROCESSES_ENV = "FLUXJAX_NUM_PROCESSES"
PROCESS_ID_ENV = "FLUXJAX_PROCESS_ID"
AUTO_ENV = "FLUXJAX_DISTRIBUTED"


def initialize() -> tuple[int, int]:
    """Join the multi-process runtime if this process is one of several; call before any JAX work.

    Returns (process_index, process_count): (0, 1) for a single process. Calling it again is harmless.
    """
    if jax.distributed.is_initialized():
        return jax.process_index(), jax.process_count()
    coordinator = os.environ.get(COORDINATOR_ENV)
    if coordinator:
        count = _int_env(NUM_PROCESSES_ENV, minimum=1)
        index = _int_env(PROCESS_ID_ENV, minimum=0)
        if index >= count:
            raise UsageError(f"{PROCESS_ID_ENV}={index} must be below {NUM_PROCESSES_ENV}={count}")
        if count == 1:
            return 0, 1
        # Only the CPU client reads this; without it CPU processes cannot run collectives.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=count, process_id=index)
    elif os.environ.get(AUTO_ENV, "").lower() == "auto" or _launcher_with_several_processes():
        jax.distributed.initialize()
    else:
        return 0, 1
    return jax.process_index(), jax.process_count()


# The one-line errors a process-0-only step may raise; every process raises the same one.
_SHARED_ERRORS = {cls.__name__: cls for cls in (UsageError, CheckpointError, FileExistsError, FileNotFoundError)}


def is_primary() -> bool:
    """Whether this process writes the files of a multi-process job (process 0), or is the only one."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (nothing to do for a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def on_primary(fn: Callable[..., Any], *args) -> Any:
    """fn(*args) run by process 0 only, its JSON-able result returned on every process.

    A step that reads or writes the shared files once for the whole job (checking --out, taking
    its lock, swapping a folder in) runs here. The others wait for its outcome, so none runs
    ahead of it, and if it fails with a one-line error (UsageError, FileExistsError, ...) every
    process raises that same error rather than waiting forever at the next collective. A single
    process just calls fn.
    """
    if jax.process_count() == 1:
        return fn(*args)
    failure = None
    record = None
    if is_primary():
        try:
            record = {"value": fn(*args)}
        except Exception as e:  # reported to the others, then raised here as it is
            failure = e
            record = {"error": type(e).__name__, "message": str(e)}
    record = json.loads(_broadcast_text(json.dumps(record) if is_primary() else ""))
    if failure is not None:
        raise failure
    if "error" in record:
        cls = _SHARED_ERRORS.get(record["error"])
        raise cls(record["message"]) if cls else RuntimeError(f"process 0 failed: {record['error']}: {record['message']}")
    return record["value"]


def everywhere(ok: bool) -> bool:
    """Whether `ok` holds on every process (a collective: all must call it)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.array([ok], np.bool_))))


def host_array(x) -> np.ndarray:
    """A whole array as NumPy on this process: gathered from the others (a collective: all must
    call it) where it is split over devices of several processes; else read where it is."""
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def _broadcast_text(text: str) -> str:
    """Process 0's `text` on every process."""
    from jax.experimental import multihost_utils

    data = np.frombuffer(text.encode("utf-8"), np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.array(data.size, np.int32)))
    # Padded to a multiple of 256 bytes: broadcasts of similar lengths reuse one compiled program.
    buffer = np.zeros(-(-max(size, 1) // 256) * 256, np.uint8)
    if is_primary():
        buffer[:size] = data
    return bytes(np.asarray(multihost_utils.broadcast_one_to_all(buffer))[:size]).decode("utf-8")


def _launcher_with_several_processes() -> bool:
    env = os.environ
    tpu_hosts = env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES") or ""
    return ("," in tpu_hosts
            or int(env.get("SLURM_NTASKS", "1") or 1) > 1
            or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1)


def _int_env(name: str, minimum: int) -> int:
    value = os.environ.get(name)
    if value is None:
        raise UsageError(f"{COORDINATOR_ENV} is set, so {name} must be set too")
    try:
        number = int(value)
    except ValueError:
        raise UsageError(f"{name}={value!r} is not an integer") from None
    if number < minimum:
        raise UsageError(f"{name}={number} must be at least {minimum}")
    return number
