"""Shared test helpers: reference models get random weights of realistic scale, errors are relative."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile small shapes; keep them out of the user's persistent cache (tested on its own).
os.environ.setdefault("FLUXJAX_COMPILATION_CACHE", "off")

import numpy as np
import pytest


def randomize_(module, seed: int = 0) -> None:
    """Give a PyTorch module random weights of the scale trained weights have.

    Matrices and kernels: N(0, 1/fan_in) (variance-preserving, as FLUX's trained weights are);
    norm scales: 1 + N(0, 0.3^2); every other vector (biases, norm shifts): N(0, 0.3^2).
    Zero or identity init would hide layout bugs (a swapped half of zeros is still zeros).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim >= 2:
                fan_in = int(np.prod(p.shape[1:]))
                value = noise / fan_in**0.5
            elif name.endswith(("weight", "scale")):  # a vector weight is a norm's scale
                value = 1 + 0.3 * noise
            else:
                value = 0.3 * noise
            p.copy_(value.to(p.dtype))


def rel_err(out, ref) -> float:
    """max |out - ref| / max |ref|, in float64."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(out - ref).max() / np.abs(ref).max())


@pytest.fixture(autouse=True)
def _torch_threads():
    """Keep PyTorch to the machine's cores so parallel test helpers do not oversubscribe."""
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
