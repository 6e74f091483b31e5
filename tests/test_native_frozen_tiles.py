"""Frozen heads on the native module of this device (the CPU extension, or on a GPU the CUDA one, whose
fp16/bf16 cases run half GEMMs) with small tiles: several row blocks and vocabulary chunks, so the
accumulators are rescaled as the running maxima move, and reverse token_kl's is re-centred, between chunks.
Float64 gold, three-way (the helpers of test_frozen_head / test_frozen_kl); the vocabulary backwards refuse."""
from __future__ import annotations

import pytest
import torch

import fastpref
from cases import DEVICE, Case, require_backend
from fastpref import backends
from oracle import grads_of, leaf, naive_kl
from test_frozen_head import CASES as STATS_CASES
from test_frozen_head import _check
from test_frozen_kl import _compare
from test_token_kl import CASES as KL_CASES
from test_token_kl import _reference_model


@pytest.fixture
def small_tiles():
    """The native backend, its module for DEVICE set to tiles of 16 rows × 64 vocabulary entries."""
    require_backend("native")
    impl = backends.resolve("native", DEVICE, torch.float32)
    mod = getattr(impl, DEVICE.type)
    old = mod.get_tiling()
    mod.set_tiling(16, 64)
    yield impl
    mod.set_tiling(*old)


def _refuse_backwards(monkeypatch, impl):
    def refuse(*a, **k):
        raise AssertionError("a frozen head must not run the backend's backward")

    monkeypatch.setattr(impl, "stats_backward", refuse)
    monkeypatch.setattr(impl, "kl_backward", refuse)


@pytest.mark.parametrize("case", list(STATS_CASES), ids=list(STATS_CASES))
def test_frozen_stats_small_tiles(small_tiles, case, monkeypatch):
    """test_frozen_head's cases (softcap, extreme logits, V = 1, fp16, ...) across many tiles."""
    _refuse_backwards(monkeypatch, small_tiles)
    c = STATS_CASES[case]
    require_backend("native", c.dtype)
    _check("native", c, ("logp", "lse", "entropy"))


@pytest.mark.gpu
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("case", list(KL_CASES), ids=list(KL_CASES))
def test_frozen_kl_small_tiles(small_tiles, case, direction, monkeypatch):
    """test_token_kl's cases across many tiles, on a GPU (the CPU module's: test_native_frozen_kl.py; the gpu
    marker also puts this file in bench/gpu_check.sh's tests)."""
    _refuse_backwards(monkeypatch, small_tiles)
    c, extra = KL_CASES[case]
    require_backend("native", c.dtype)
    h, w, b, labels = c.make()
    rh, rw, rb = _reference_model(c, extra.get("ref_D"), extra.get("ref_scale"), extra.get("ref_bias", False))
    opts = dict(direction=direction, temperature=c.temperature, softcap=c.softcap,
                ref_softcap=extra.get("ref_softcap"))
    _compare("native", h, w, b, rh, rw, rb, labels if extra.get("labels") else None, c.upstream(2), c.dtype, opts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_frozen_kl_policy_near_reference(small_tiles, direction, dtype, monkeypatch):
    """A policy close to its reference (the KL-penalty regime, p ≈ q), where dKL/dh is small: the frozen
    path's d_hidden of the KL alone is as accurate as the vocabulary backward's, not lost to the rounding of
    two nearly equal expectations (CUDA rounds the weights of its half GEMMs; a float32 simulation of E_p[s·W]
    and E_q[s·W] rounded separately to bf16 errs about 20x more). Plus the three-way check with labels."""
    require_backend("native", dtype)
    c = Case(N=40, D=32, V=600, dtype=dtype, bias=True, softcap=20.0, seed=95)
    h, w, b, labels = c.make()
    g = torch.Generator().manual_seed(96)
    rh = (h.double() + 0.02 * torch.randn(h.shape, generator=g, dtype=torch.float64).to(DEVICE)).to(dtype)
    opts = dict(direction=direction, temperature=1.0, softcap=20.0, ref_softcap=20.0)
    ups = c.upstream(2)

    def d_hidden(x, weight, dt=None):
        if dt is None:
            kl = fastpref.token_kl(x, weight, rh, w, bias=b, ref_bias=b, backend="native", **opts).kl
        else:
            kl = naive_kl(x, weight, b.to(dt), rh, w, b, None, dtype=dt, **opts)[0]
        return grads_of([kl], ups[:1], [x])[0].double()

    vocab = d_hidden(leaf(h), leaf(w))  # the weight needs a gradient: the vocabulary backward
    gold = d_hidden(leaf(h, torch.float64), w.double(), torch.float64)
    _refuse_backwards(monkeypatch, small_tiles)
    frozen = d_hidden(leaf(h), w)
    err, vocab_err = (frozen - gold).norm(), (vocab - gold).norm()
    assert err <= 2 * vocab_err + 1e-5 * gold.norm(), (float(err), float(vocab_err), float(gold.norm()))
    _compare("native", h, w, b, rh, w, b, labels, ups, dtype, opts)
