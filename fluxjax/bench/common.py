"""Timing helpers shared by the benchmarks."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Sequence

import numpy as np


def median_time(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of `fn()` in seconds; `fn` must block until its result is ready."""
    return median_times([fn], repeat, warmup)[0]


def median_times(fns: Sequence[Callable[[], object]], repeat: int = 5, warmup: int = 1) -> list[float]:
    """Median wall time in seconds of each of `fns` (each must block until its result is ready).

    The functions take turns within every repetition, so a slow spell of a shared machine falls
    on all of them instead of on whichever happened to be timed then.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeat):
        for fn, samples in zip(fns, times):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
    return [statistics.median(samples) for samples in times]


def add_model_size_arguments(parser: argparse.ArgumentParser, hidden: int, heads: int) -> None:
    """--hidden, --heads, --double, --single: the size of a small random FLUX transformer."""
    parser.add_argument("--hidden", type=int, default=hidden, help="model width (FLUX.1: 3072)")
    parser.add_argument("--heads", type=int, default=heads, help="attention heads (FLUX.1: 24)")
    parser.add_argument("--double", type=int, default=2, help="double-stream blocks (FLUX.1: 19)")
    parser.add_argument("--single", type=int, default=4, help="single-stream blocks (FLUX.1: 38)")


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """FLUX's (16, 56, 56) RoPE split of a 128-wide head, scaled to `head_dim` (all even)."""
    first = 2 * max(1, round(head_dim * 16 / 128 / 2))
    col = (head_dim - first) // 4 * 2
    return first, head_dim - first - col, col


# Every figure a benchmark reports in this process, for `fluxjax bench`'s table and JSON.
RESULTS: list[dict] = []


def record(name: str, fluxjax: float, reference: float | None = None, unit: str = "ms", against: str = "") -> None:
    """Keep one figure (and the reference's, when there is one) for the summary table."""
    RESULTS.append(dict(name=name.strip(), fluxjax=fluxjax, reference=reference, unit=unit, against=against,
                        ratio=None if reference is None else reference / fluxjax))


def report(name: str, fluxjax_s: float, reference_s: float, reference: str = "PyTorch") -> None:
    """One line: both times and the speed-up of fluxjax over the reference (also recorded)."""
    line = (
        f"{name}: fluxjax {fluxjax_s * 1e3:.1f} ms, {reference} {reference_s * 1e3:.1f} ms, "
        f"speed-up {reference_s / fluxjax_s:.2f}x"
    )
    print(line, flush=True)
    record(name, fluxjax_s * 1e3, reference_s * 1e3, "ms", reference)


def max_rel_error(ours, reference) -> float:
    """max |ours - reference| / max |reference|: the agreement a benchmark prints beside its times."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())
