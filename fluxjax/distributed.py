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

import os

import jax

from fluxjax.errors import UsageError

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
