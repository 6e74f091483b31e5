"""Per-call latency: the first call of a fresh process and the steady state, fastpref vs plain torch.

    python -m bench.latency --impl fastpref|torch --device cpu|cuda --shape N,D,V [--dtype float32] [--steady 10]

Runs in the interpreter it is started in (the benchmark runner starts a fresh one per measurement, so
nothing is imported or compiled before the first call) and prints one JSON line: the milliseconds of
``import fastpref`` (after torch), of the first forward+backward of per-token log-probs, and the median of
``--steady`` later ones after three warm-up calls. Inputs are made, and the device initialised, before any
timed region; every timed region ends with a device synchronisation. fastpref runs its default backend
("auto"), as a user's first call would; the Triton cache on disk is whatever the machine has.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(impl: str, device: torch.device, shape: tuple[int, int, int], dtype: torch.dtype, steady: int) -> dict:
    """{'import_ms', 'first_call_ms', 'median_ms', 'min_ms', 'max_ms', 'times_ms', 'backend'} of one impl."""
    N, D, V = shape
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, D, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(V, D, generator=g) / D ** 0.5).to(device, dtype).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g).to(device)
    gout = torch.randn(N, generator=g).to(device)
    _sync(device)
    import_ms = backend = None
    if impl == "fastpref":
        t0 = time.perf_counter()
        import fastpref

        import_ms = (time.perf_counter() - t0) * 1e3
        backend = fastpref.backends.resolve("auto", device, dtype).name

        def call():
            fastpref.token_logprobs(h, w, y).backward(gout)
    elif impl == "torch":
        from bench.impls import plain_logprobs  # (imports fastpref too; not timed, and no torch op runs)

        def call():
            plain_logprobs(h, w, y).backward(gout)
    else:
        raise SystemExit(f"--impl must be fastpref or torch, got {impl!r}")

    def timed() -> float:
        _sync(device)
        t = time.perf_counter()
        call()
        _sync(device)
        h.grad = w.grad = None
        return (time.perf_counter() - t) * 1e3

    first = timed()
    for _ in range(3):
        timed()
    times = [timed() for _ in range(steady)]
    return {"import_ms": import_ms, "first_call_ms": first, "median_ms": statistics.median(times),
            "min_ms": min(times), "max_ms": max(times), "times_ms": times, "repeats": steady, "warmup": 3,
            "backend": backend}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", required=True, choices=("fastpref", "torch"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--shape", required=True, help="N,D,V")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--steady", type=int, default=10, help="timed calls after the first and three warm-ups")
    a = p.parse_args(argv)
    shape = tuple(int(x) for x in a.shape.split(","))
    if len(shape) != 3:
        p.error(f"--shape takes N,D,V, got {a.shape!r}")
    r = measure(a.impl, torch.device(a.device), shape, getattr(torch, a.dtype), a.steady)
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
