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


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux ≥ 4.0: ``echo 5 > /proc/self/clear_refs``).
    False where that is not possible; the peak then falls back to ru_maxrss, which includes everything since
    the process started."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = _status_kib("VmHWM"), _status_kib("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 1024


def malloc_trim() -> None:
    """Hand freed heap memory back to the OS (glibc), so that RSS counts live memory: freed temporaries kept
    by the allocator would otherwise be reused later without raising the high-water mark."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_mib() -> float | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib / 1024


def peak_rss_mib() -> float:
    kib = _status_kib("VmHWM")
    if kib is None:
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024


CPU_MEMORY_METHOD = (
    "CPU peak memory: every implementation × workload × shape runs in its own freshly forked process. After the "
    "inputs exist and freed heap memory is handed back to the OS (glibc malloc_trim, so that RSS counts live memory "
    "only), the process's resident set is recorded (VmRSS) and its high-water mark reset "
    "(/proc/self/clear_refs = 5); the peak is VmHWM after the timed repeats minus that RSS, in MiB. The high-water "
    "mark is reset again (after another malloc_trim) after the warm-up, so one-time costs (torch.compile's compilation, lazy imports) are "
    "excluded from 'peak MiB' and included in 'peak incl. warm-up'. Where clear_refs cannot be written, ru_maxrss "
    "is used instead (then the warm-up is included). What a warm-up leaves resident (compiled code, allocator "
    "caches) counts in both, so compiled implementations carry some tens of MiB of compiled artifacts."
)
CUDA_MEMORY_METHOD = (
    "GPU peak memory: torch.cuda.max_memory_allocated over the timed repeats minus memory_allocated after the "
    "inputs exist and the warm-up ran (caching-allocator view, MiB)."
)


def measure_entry(step: Callable[[], object], device: torch.device, *, repeats: int, warmup: int) -> dict:
    """Time step() (median/min/max ms over repeats after warm-up, device-synchronised) and its peak memory
    above what existed before the first call (see CPU_MEMORY_METHOD / CUDA_MEMORY_METHOD)."""
    gc.collect()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        malloc_trim()
        base = rss_mib()
        resettable = reset_peak_rss()
    sample = None
    for _ in range(warmup):
        sample = step()
    _sync(device)
    if cuda:
        peak_warm = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
    else:
        peak_warm = peak_rss_mib() - base
        if resettable:
            malloc_trim()
            reset_peak_rss()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        sample = step()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    if cuda:
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        method = "cuda-allocator"
    else:
        peak = peak_rss_mib() - base
        method = "VmHWM-reset" if resettable else "ru_maxrss"
    return {
        "median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "times_ms": times,
        "repeats": repeats, "warmup": warmup, "peak_mib": peak,
        "peak_incl_warmup_mib": max(peak, peak_warm) if warmup else peak, "mem_method": method,
        "sample": sample,
    }
