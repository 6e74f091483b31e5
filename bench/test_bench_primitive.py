"""Microbenchmarks of the per-token log-probs (tiny to small shapes), every implementation that runs here.

    pytest bench --benchmark-only [--benchmark-group-by=param:shape]
"""
import pytest
import torch

from bench import impls as I
from bench.workloads import Entry, build_step

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = "bfloat16" if DEVICE.type == "cuda" else "float32"
SHAPES = {"tiny": (256, 64, 1000), "small": (1024, 128, 8000)}   # N, D, V
IMPLS = [i.key for i in I.LOGPROB_IMPLS]


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_logprobs(benchmark, shape, impl, mode):
    N, D, V = SHAPES[shape]
    try:
        _inputs, step = build_step(Entry("logprobs", impl, mode, N, D, V, DTYPE), DEVICE)
    except I.Unavailable as why:
        pytest.skip(str(why))
    benchmark.group = f"logprobs {mode} {shape}"
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)
    benchmark.pedantic(lambda: (step(), sync()), rounds=5, warmup_rounds=1, iterations=1)
