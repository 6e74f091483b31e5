"""token_kl with a frozen policy head on the native CPU backend: many row blocks and vocabulary chunks (the
online rescaling and the reverse direction's re-centring across chunks), the scratch of its forward against
the extension's documented bound, and scratch plus the saved [N, D] expectations against the naive logits."""
from __future__ import annotations

import pytest
import torch

import fastpref
from cases import DEVICE, Case, require_backend
from fastpref import backends
from test_frozen_kl import _compare
from test_token_kl import CASES, _reference_model


@pytest.fixture
def cpu_module(monkeypatch):
    """The CPU extension, on at most two threads, with the backend's vocabulary backward refused."""
    require_backend("native")
    if DEVICE.type != "cpu":
        pytest.skip("the CPU extension's scratch counter")
    impl = backends.resolve("native", DEVICE, torch.float32)

    def refuse(*a, **k):
        raise AssertionError("a frozen policy head must not run the backend's kl_backward")

    monkeypatch.setattr(impl, "kl_backward", refuse)
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    yield impl.cpu
    torch.set_num_threads(threads)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_frozen_kl_across_small_tiles(cpu_module, case, direction):
    """test_frozen_kl's cases with tiles of 16 rows × 64 entries: every case spans several vocabulary chunks,
    so the running maxima and the running mean of d move between chunks."""
    c, extra = CASES[case]
    old = cpu_module.get_tiling()
    cpu_module.set_tiling(16, 64)
    try:
        h, w, b, labels = c.make()
        rh, rw, rb = _reference_model(c, extra.get("ref_D"), extra.get("ref_scale"), extra.get("ref_bias", False))
        opts = dict(direction=direction, temperature=c.temperature, softcap=c.softcap,
                    ref_softcap=extra.get("ref_softcap"))
        _compare("native", h, w, b, rh, rw, rb, labels if extra.get("labels") else None, c.upstream(2), c.dtype,
                 opts)
    finally:
        cpu_module.set_tiling(*old)


@pytest.mark.parametrize("with_labels", [True, False], ids=["labels", "no_labels"])
def test_native_frozen_kl_memory(cpu_module, with_labels):
    """Forward + backward: scratch ≤ scratch_bound_bytes, and scratch + the saved dkl (and ea with labels),
    float32 [N, D] each, ≤ 1/8 of both models' naive float32 logits."""
    mod = cpu_module
    N, D, Dr, V = 512, 32, 48, 64000
    h, w, _, labels = Case(N=N, D=D, V=V, seed=91).make()
    rh, rw, _, _ = Case(N=N, D=Dr, V=V, seed=92).make()
    hh = h.detach().requires_grad_(True)
    out = fastpref.token_kl(hh, w, rh, rw, labels if with_labels else None, direction="reverse", backend="native")
    scratch = mod.last_scratch_bytes()
    loss = out.kl.sum() + (out.logp.sum() if with_labels else 0.0)
    loss.backward()
    bound = mod.scratch_bound_bytes(N, D, Dr, V)
    saved = (2 if with_labels else 1) * N * D * 4
    assert 0 < scratch <= bound
    assert scratch + saved <= 2 * N * V * 4 / 8, (scratch, saved, 2 * N * V * 4)
    assert hh.grad is not None and torch.isfinite(hh.grad).all() and hh.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_kl_scratch_with_tall_tiles(cpu_module, dtype):
    """Tiles with more rows than vocabulary entries (R > C), half inputs, no labels: the [R, D] accumulator
    of the label-free frozen forward is what the bound's D_kl term covers."""
    mod = cpu_module
    old = mod.get_tiling()
    mod.set_tiling(64, 16)
    try:
        N, D, Dr, V = 200, 24, 40, 700
        g = torch.Generator().manual_seed(93)
        h, w, b = (torch.randn(*s, generator=g).to(dtype) for s in ((N, D), (V, D), (V,)))
        rh, rw = (torch.randn(*s, generator=g).to(dtype) for s in ((N, Dr), (V, Dr)))
        for labels in (torch.randint(0, V, (N,), generator=g), None):
            mod.kl_forward_frozen(h, w, b, rh, rw, b, labels, 1.0, 0.0, 0.0, True)
            assert 0 < mod.last_scratch_bytes() <= mod.scratch_bound_bytes(N, D, Dr, V)
    finally:
        mod.set_tiling(*old)
