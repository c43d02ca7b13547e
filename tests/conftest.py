"""Shared test helpers. Random weights for reference models: fluxjax.testing.reference.randomize_."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile small shapes; keep them out of the user's persistent cache (tested on its own).
os.environ.setdefault("FLUXJAX_COMPILATION_CACHE", "off")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Every test process has 8 simulated CPU devices, so tests/multidevice/ runs in it as ordinary tests.
# The flag is read when JAX's backend starts (here, before any test); it is then taken back out of
# the environment, so the subprocesses tests start get JAX's default of one device (or the count
# tests/processes.py gives them). Single-device code is unchanged: jax.devices()[0] is the default.
_XLA_FLAGS = os.environ.get("XLA_FLAGS")
os.environ["XLA_FLAGS"] = f"{_XLA_FLAGS or ''} --xla_force_host_platform_device_count=8".strip()
DEVICES = jax.device_count()
if _XLA_FLAGS is None:
    del os.environ["XLA_FLAGS"]
else:
    os.environ["XLA_FLAGS"] = _XLA_FLAGS


def rel_err(out, ref) -> float:
    """max |out - ref| / max |ref|, in float64."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(out - ref).max() / np.abs(ref).max())


@pytest.fixture(autouse=True)
def _torch_threads():
    """Keep PyTorch to the machine's cores so parallel test helpers do not oversubscribe."""
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    """The files with the most `slow` tests first, each file's tests in their own order.

    pytest-xdist's loadfile hands out whole files, by default the files with the most tests first
    (pyproject.toml turns that off with --no-loadscope-reorder): the slowest files, a few tests of
    minutes each (the 8-device pipelines, the multi-process runs), came last, where one worker can
    run them alone while the other has nothing left. Largest first, the last files are short ones.
    """
    files: dict[str, list] = {}
    for item in items:
        files.setdefault(item.nodeid.split("::")[0], []).append(item)
    slow = {f: sum(1 for i in tests if i.get_closest_marker("slow")) for f, tests in files.items()}
    order = sorted(files, key=lambda f: (-slow[f], -len(files[f])))
    items[:] = [item for f in order for item in files[f]]
