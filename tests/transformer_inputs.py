"""Random inputs of the FLUX transformer, shared by the subprocess workers that compare sharded
runs with single-device ones (imported from the workers' own folder)."""

from __future__ import annotations

import numpy as np

from fluxjax.sampling import sampler as sampling
from fluxjax.config import FluxConfig


def random_inputs(cfg: FluxConfig, batch: int, grid: tuple[int, int], txt_len: int, rng: np.random.Generator,
                  guidance: float = 3.5) -> tuple:
    """(img, img_ids, txt, txt_ids, timesteps, vec, guidance), float32, as `Flux.__call__` takes them,
    for a `grid` = (rows, cols) of packed image tokens and `txt_len` text tokens."""
    rows, cols = grid
    return (
        rng.standard_normal((batch, rows * cols, cfg.in_channels)).astype(np.float32),
        np.array(sampling.image_ids(batch, rows * sampling.PIXELS_PER_TOKEN, cols * sampling.PIXELS_PER_TOKEN)),
        rng.standard_normal((batch, txt_len, cfg.context_in_dim)).astype(np.float32),
        sampling.text_ids(batch, txt_len),
        rng.uniform(size=batch).astype(np.float32),
        rng.standard_normal((batch, cfg.vec_in_dim)).astype(np.float32),
        np.full(batch, guidance, np.float32),
    )
