"""Shared test helpers. Random weights for reference models: fluxjax.testing.reference.randomize_."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile small shapes; keep them out of the user's persistent cache (tested on its own).
os.environ.setdefault("FLUXJAX_COMPILATION_CACHE", "off")

import numpy as np
import pytest


def rel_err(out, ref) -> float:
    """max |out - ref| / max |ref|, in float64."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(out - ref).max() / np.abs(ref).max())


@pytest.fixture(autouse=True)
def _torch_threads():
    """Keep PyTorch to the machine's cores so parallel test helpers do not oversubscribe."""
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
