"""Microbenchmarks of the loss workloads (DPO with a reference model, token KL, listwise K=4), small shapes.

    pytest bench --benchmark-only
"""
import pytest
import torch

from bench import impls as I
from bench.workloads import Entry, build_step

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = "bfloat16" if DEVICE.type == "cuda" else "float32"
N, D, V, T = 512, 128, 8000, 128
FASTPREF = ["fastpref[triton]", "fastpref[native]", "fastpref[torch]"]
CASES = (
    [("dpo", i, 2) for i in FASTPREF + ["torch", "torch.lce", "trl-chunked", "liger-selective", "liger-dpo"]]
    + [("token_kl", i, 0) for i in FASTPREF + ["torch"]]
    + [("listwise", i, 4) for i in FASTPREF + ["torch"]]
)


@pytest.mark.parametrize("workload,impl,K", CASES, ids=[f"{w}-{i}" for w, i, _ in CASES])
def test_loss(benchmark, workload, impl, K):
    e = Entry(workload, impl, "forward+backward", N, D, V, DTYPE, T=T if K else 0, K=K)
    try:
        _inputs, step = build_step(e, DEVICE)
    except I.Unavailable as why:
        pytest.skip(str(why))
    benchmark.group = workload
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)
    benchmark.pedantic(lambda: (step(), sync()), rounds=5, warmup_rounds=1, iterations=1)
