"""The timing harness the bench tools share: percentiles, CPU time of a process, GPU time inside CUDA graphs,
the copy bandwidth every floor is measured against, and the aligned result lines they print."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0-100), interpolated between the two nearest samples (numpy's default)."""
    xs = sorted(values)
    if not xs:
        raise ValueError("percentile of no values")
    at = (len(xs) - 1) * q / 100
    lo, hi = math.floor(at), math.ceil(at)
    return xs[lo] + (xs[hi] - xs[lo]) * (at - lo)


def median(values: Iterable[float]) -> float:
    return percentile(values, 50)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def graph_us(calls: list[Callable[[], object]], ms: float = 20.0) -> float:
    """Mean µs per call of `calls`, captured in order in one CUDA graph and replayed for about `ms` milliseconds:
    the launch cost a decode step pays inside its graph, with no L2 flush (cycle enough inputs to defeat L2)."""
    import torch

    for fn in calls[:2]:
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    reps = max(3, min(500, int(ms / start.elapsed_time(end))))
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (reps * len(calls))


def replay_us(fn: Callable[[], object]) -> float:
    """Median µs of `fn` captured in a CUDA graph and replayed with L2 flushed before each replay
    (triton.testing.do_bench): a kernel reading its inputs from HBM, as in a real step."""
    import torch
    import triton

    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return 1e3 * triton.testing.do_bench(graph.replay, warmup=5, rep=40, return_mode="median")


def copy_bandwidth() -> float:
    """Bytes per second a device-to-device copy of 256 MiB moves (read + write): the rate of every floor."""
    import torch

    x = torch.empty(2**28, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    return 2 * x.numel() * 20 / (start.elapsed_time(end) / 1e3)


def print_results(results: dict[str, float]) -> None:
    """One aligned `name: value` line per result, as every tool ends."""
    width = max(map(len, results), default=0)
    for name, value in results.items():
        print(f"{name:>{width}}: {value:,.3f}", flush=True)


def top_kernels(prof: torch.profiler.profile, n: int, steps: int = 1) -> list[str]:
    """The n kernels of a torch profile that took the most device time: µs and calls per step, name."""
    events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:n]
    return [f"  {e.device_time_total / steps:9.1f} {e.count / steps:6.0f}  {e.key[:110]}" for e in events]
