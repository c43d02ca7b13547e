"""Test helper: run one fluxjax command as several local JAX processes (a local coordinator,
gloo CPU collectives; see fluxjax.parallel.distributed), as a multi-host launcher would."""

import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def base_env(devices: int | None = None, **extra: str) -> dict:
    """The environment of a CLI subprocess: CPU, offline, no persistent compilation cache,
    `devices` simulated CPU devices (None: JAX's default of one)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "FLUXJAX_COMPILATION_CACHE": "off", "HF_HUB_OFFLINE": "1", **extra}
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def start_processes(args: list[str], processes: int, env: dict) -> list[subprocess.Popen]:
    """`python -m fluxjax.commands.cli *args` as process 0..processes-1 of one distributed job."""
    env = {**env, "FLUXJAX_COORDINATOR": f"localhost:{free_port()}", "FLUXJAX_NUM_PROCESSES": str(processes)}
    return [subprocess.Popen([sys.executable, "-m", "fluxjax.commands.cli", *args], env={**env, "FLUXJAX_PROCESS_ID": str(i)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(processes)]


def finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[str, str]]:
    """Wait for the processes; assert each exited 0 (showing its stderr); their (stdout, stderr)."""
    results = [p.communicate(timeout=timeout) for p in procs]
    for i, (p, (_, err)) in enumerate(zip(procs, results)):
        assert p.returncode == 0, f"process {i}: {err[-4000:]}"
    return results
