"""The Triton backend's two backward strategies ("gemm", "atomic"): float64 oracle, scratch budget, determinism.

The "gemm" runs use a scratch floor of one interpreter tile so that every case is cut into several
row × vocabulary blocks (the accumulation across blocks is what is under test).
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import test_token_kl
import test_token_stats
from cases import DEVICE, Case, require_backend
from fastpref import backends

pytest.importorskip("triton")

STATS_CASES = ["bias_ignore", "softcap_temp", "extreme", "wide", "fp16"]
KL_CASES = ["labels_ignore_bias", "softcap_temp", "extreme"]


@pytest.fixture
def triton_backend():
    require_backend("triton")
    b = backends.resolve("triton", DEVICE, torch.float32)
    yield b
    b.backward, b.scratch_floor = None, None


def _small_blocks(b, strategy):
    from fastpref.kernels import presets

    cfg = presets.select("stats_dlogits", torch.float32, DEVICE)
    b.backward = strategy
    b.scratch_floor = cfg.BN * cfg.BV * 4 if DEVICE.type == "cpu" else None


@pytest.mark.parametrize("strategy,case", [("gemm", c) for c in STATS_CASES]
                         + [("atomic", c) for c in ("softcap_temp", "fp16")])
def test_stats_oracle(triton_backend, strategy, case):
    _small_blocks(triton_backend, strategy)
    test_token_stats._check("triton", test_token_stats.CASES[case])


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("case", KL_CASES)
def test_kl_oracle_gemm(triton_backend, case, direction):
    _small_blocks(triton_backend, "gemm")
    c, extra = test_token_kl.CASES[case]
    test_token_kl._check("triton", c, direction, **extra)


class _Allocations(TorchDispatchMode):
    """Bytes of every tensor an aten op returns (factory functions included)."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and not t._is_view():
                self.sizes.append(t.untyped_storage().nbytes())
        return out


def test_gemm_scratch_stays_within_budget(triton_backend):
    """Every allocation of the backward is below the stated budget, except the float32 outputs themselves."""
    from fastpref.kernels import gemm_backward
    from fastpref.options import LogitOptions

    _small_blocks(triton_backend, "gemm")
    M, D, V = 200, 24, 1037
    h, w, b, lab = Case(N=M, D=D, V=V, bias=True, seed=60).make()
    opts = LogitOptions()
    _, lse, ent, _ = triton_backend.stats_forward(h, w, b, lab, opts, True, False)
    g = Case(N=M, seed=61).upstream(3)
    g = [x.float() for x in g]
    budget = gemm_backward.scratch_budget(M, V, h.dtype, triton_backend.scratch_floor)
    assert budget == triton_backend.scratch_floor  # the floor dominates 1% of 200·1037·4 bytes
    with _Allocations() as rec:
        dh, dw, db = triton_backend.stats_backward(h, w, b, lab, lse, ent, *g, opts, (True, True, True))
    outputs = {dh.numel() * 4, dw.numel() * 4, db.numel() * 4}
    assert 0 < triton_backend.last_scratch_bytes <= budget
    over = [s for s in rec.sizes if s > budget and s not in outputs]
    assert not over, f"allocations above the {budget}-byte budget: {over}"
    assert max(rec.sizes) < M * V * 4 / 4, "nothing close to the naive logits may be allocated"


@pytest.mark.parametrize("rows,vocab,elems", [(200, 1037, 64 * 256), (5, 100000, 64 * 256), (100000, 300, 64 * 256),
                                              (10**6, 128256, 2**27), (16384, 128256, 2**27), (7, 9, 10**6)])
def test_block_shape_respects_budget(rows, vocab, elems):
    from fastpref.kernels.gemm_backward import block_shape

    r, c = block_shape(rows, vocab, elems, 64, 256)
    assert r * c <= elems and 1 <= r <= rows and 1 <= c <= vocab
    assert r == rows or r % 64 == 0
    assert c == vocab or c % 256 == 0
    with pytest.raises(ValueError, match="below one"):
        block_shape(rows, vocab, 64 * 256 - 1, 64, 256)


def _grads(b, seed):
    from fastpref.options import LogitOptions

    h, w, bias, lab = Case(N=90, D=40, V=700, bias=True, softcap=5.0, seed=seed).make()
    opts = LogitOptions(softcap=5.0)
    _, lse, ent, _ = b.stats_forward(h, w, bias, lab, opts, True, False)
    g = [x.float() for x in Case(N=90, seed=seed).upstream(3)]
    return b.stats_backward(h, w, bias, lab, lse, ent, *g, opts, (True, True, True))


def test_deterministic_algorithms(triton_backend):
    """Under torch.use_deterministic_algorithms the gemm backward repeats bit for bit; atomic is refused."""
    _small_blocks(triton_backend, None)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = _grads(triton_backend, 62), _grads(triton_backend, 62)
        for x, y in zip(first, second):
            assert torch.equal(x, y)
        triton_backend.backward = "atomic"
        with pytest.raises(RuntimeError, match="FASTPREF_TRITON_BACKWARD=gemm"):
            _grads(triton_backend, 62)
    finally:
        torch.use_deterministic_algorithms(before)


def test_strategy_from_environment(triton_backend, monkeypatch):
    from fastpref.backends.triton_backend import backward_strategy

    monkeypatch.setenv("FASTPREF_TRITON_BACKWARD", "atomic")
    assert backward_strategy() == "atomic" and backward_strategy("gemm") == "gemm"
    monkeypatch.setenv("FASTPREF_TRITON_BACKWARD", "")
    assert backward_strategy() == "gemm"
    monkeypatch.setenv("FASTPREF_TRITON_BACKWARD", "fast")
    with pytest.raises(ValueError, match="atomic"):
        backward_strategy()
