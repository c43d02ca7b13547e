"""tests/multidevice/: tests that need several devices, run as ordinary tests in the test process,
which tests/conftest.py starts with 8 simulated CPU devices (tests/processes.py runs real
multi-process jobs instead)."""

import jax
import pytest


@pytest.fixture(autouse=True)
def _eight_devices():
    """Fail, not skip, where the process was not given its 8 devices (a backend started before
    tests/conftest.py set the flag, or a platform other than the CPU)."""
    assert jax.device_count() == 8, f"tests/multidevice needs 8 simulated CPU devices, found {jax.devices()}"
