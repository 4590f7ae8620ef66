"""Timing helpers for the benchmarks: warm-up outside the timed region, device sync, median and spread."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: dict[str, Callable[[], object]], *, device: torch.device, repeats: int = 15, warmup: int = 3
) -> dict[str, list[float]]:
    """Seconds per call of each fn; contenders run round-robin so that machine drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def time_blocked(
    fns: dict[str, Callable[[], object]], *, device: torch.device, repeats: int = 15, warmup: int = 3
) -> dict[str, list[float]]:
    """Seconds per call, each fn warmed up and timed in its own block.

    For pairs where one contender's memory churn changes the allocator state the next one finds (the original
    module frees hundreds of MB per step, which glibc hands back to the OS, so whatever runs next
    faults it back in), round-robin timing measures that interaction rather than the contenders.
    """
    times: dict[str, list[float]] = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        sync(device)
        times[name] = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def median(ts: list[float]) -> float:
    return statistics.median(ts)


def spread(ts: list[float]) -> float:
    """Interquartile range relative to the median (0 for fewer than two samples)."""
    if len(ts) < 2:
        return 0.0
    q = statistics.quantiles(ts, n=4)
    return (q[2] - q[0]) / statistics.median(ts)
