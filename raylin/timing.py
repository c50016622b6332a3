"""Latency and peak memory of one call: what ``raylin eval`` reports of a teacher and its student,
and what every speed benchmark (raylin.bench.speed) measures with.

Latency is the best of ``repeats`` timed runs (so the first run only warms up); peak memory is the
largest amount of tensor memory the call holds at once above what existed before it, replayed from
torch's allocation events in a separate profiled run (so profiling never slows a timing). Limits:
CPU allocations only (the profiler's CPU memory events); numbers depend on the machine.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile


def peak_allocated_mb(fn: Callable[[], object]) -> float:
    """Peak of tensor memory allocated by ``fn()`` above what was allocated before, in MB.

    Replays torch's allocation and free events (profiler ``profile_memory``) in time order, using
    each op's own allocations so nested ops are not counted twice.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.inference_mode():
            fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    current = peak = 0
    for event in events:
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak / 1e6


def measure(fn: Callable[[], object], repeats: int = 2, memory: bool = True) -> tuple[float, float]:
    """(best latency in seconds over ``repeats`` runs, peak allocated MB) of ``fn()``; the peak is
    0.0 without ``memory`` (the profiled replay is skipped)."""
    latencies = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        with torch.inference_mode():
            fn()
        latencies.append(time.perf_counter() - start)
    return min(latencies), peak_allocated_mb(fn) if memory else 0.0
