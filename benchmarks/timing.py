"""Wall-clock timing shared by the benchmarks (synchronising CUDA so GPU work is counted)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def timed(fn: Callable[[], object], repeats: int, device: str) -> list[float]:
    """Seconds per call of `fn`, `repeats` times (no warm-up: callers do their own)."""
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times
