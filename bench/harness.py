"""Timing and peak-memory measurement shared by the benchmarks."""
from __future__ import annotations

import gc
import statistics
import time
from typing import Callable

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, *, repeats: int = 5, warmup: int = 1) -> dict:
    """Run fn warmup + repeats times; report median/min/max milliseconds and, on CUDA, the allocator's
    peak above what was allocated before the call (MiB)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    gc.collect()
    times = []
    peak = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "repeats": repeats,
        "peak_mib": peak,
    }


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """rows of dicts → a markdown table with the (key, header) columns given."""
    def fmt(v):
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])
