"""Frozen heads (weight and bias need no gradient): the forward forms E_p[(dz/dx)·W] and the backward makes
dL/dh with no pass over the vocabulary. Float64 gold, three-way, every backend; memory of the path."""
from __future__ import annotations

import pytest
import torch

import fastpref
from cases import BACKENDS, DEVICE, Case, require_backend
from fastpref import backends
from oracle import assert_three_way, grads_of, leaf, naive_stats
from test_banned_tokens import _head, tiled  # noqa: F401 (tiled: the fixture)

CASES = {
    "bias_ignore": Case(bias=True, ignore_frac=0.3, seed=71),
    "softcap_temp": Case(bias=True, softcap=3.0, temperature=0.7, seed=72),
    "peaked": Case(peaked=True, ignore_frac=0.2, seed=73),
    "extreme": Case(scale=2000.0, bias=True, seed=74),
    "extreme_softcap": Case(scale=2000.0, softcap=30.0, seed=75),
    "odd": Case(N=9, D=130, V=1037, temperature=1.3, seed=76),
    "tiny_vocab": Case(N=5, D=16, V=1, seed=77),
    "fp16": Case(dtype=torch.float16, bias=True, ignore_frac=0.25, seed=78),
}


def _no_vocabulary_backward(monkeypatch, backend):
    """Make any backward pass over the vocabulary fail loudly."""
    impl = backends.resolve(backend, DEVICE, torch.float32)

    def refuse(*a, **k):
        raise AssertionError("a frozen head must not run the backend's backward")

    monkeypatch.setattr(impl, "stats_backward", refuse)


def _check(backend, case: Case, outputs):
    require_backend(backend, case.dtype)
    h, w, b, labels = case.make()
    opts = dict(temperature=case.temperature, softcap=case.softcap)
    want_ent = "entropy" in outputs
    ups = case.upstream(3)
    hh = leaf(h)
    st = fastpref.token_stats(hh, w, labels, bias=b, entropy=want_ent, backend=backend, **opts)
    pick = lambda s: [getattr(s, k) if k in outputs else None for k in ("logp", "lse", "entropy")]  # noqa: E731
    got = grads_of(pick(st), ups, [hh])[0]
    gold_h, ref_h = leaf(h, torch.float64), leaf(h)
    gold = naive_stats(gold_h, w.double(), None if b is None else b.double(), labels, **opts)
    ref = naive_stats(ref_h, w, b, labels, dtype=case.dtype, **opts)
    gold_g = grads_of([gold[i] if k in outputs else None for i, k in enumerate(("logp", "lse", "entropy"))], ups,
                      [gold_h])[0]
    ref_g = grads_of([ref[i] if k in outputs else None for i, k in enumerate(("logp", "lse", "entropy"))], ups,
                     [ref_h])[0]
    assert got.dtype == h.dtype
    assert_three_way("d_hidden", got, ref_g, gold_g, case.dtype, grad=True)
    ignored = labels == -100
    if ignored.any():
        assert (got[ignored] == 0).all()


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_head_hidden_grad(backend, case, monkeypatch):
    _no_vocabulary_backward(monkeypatch, backend)
    _check(backend, CASES[case], ("logp", "lse", "entropy"))


@pytest.mark.parametrize("outputs", [("logp",), ("lse",), ("entropy",), ("logp", "lse")])
@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_head_each_output(backend, outputs, monkeypatch):
    _no_vocabulary_backward(monkeypatch, backend)
    _check(backend, Case(bias=True, softcap=4.0, ignore_frac=0.2, seed=79), outputs)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("softcap", [None, 3.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("tiled", BACKENDS, indirect=True)
def test_frozen_head_with_banned_tokens(tiled, softcap, monkeypatch):
    """−inf bias entries, a whole first tile of them included (the running max is −inf after it)."""
    _no_vocabulary_backward(monkeypatch, tiled)
    case, h, w, b, labels = _head(64, softcap)
    opts = dict(temperature=0.8, softcap=softcap)
    ups = case.upstream(3)
    grads = {}
    for tag, dt, name in (("ours", torch.float32, tiled), ("gold", torch.float64, None),
                          ("ref", torch.float32, None)):
        x = leaf(h, dt)
        if name is None:
            outs = naive_stats(x, w.to(dt), b.to(dt), labels, dtype=dt, **opts)[:3]
        else:
            st = fastpref.token_stats(x, w, labels, bias=b, entropy=True, backend=name, **opts)
            outs = [st.logp, st.lse, st.entropy]
        grads[tag] = grads_of(list(outs), ups, [x])[0]
    assert_three_way("d_hidden", grads["ours"], grads["ref"], grads["gold"], torch.float32, grad=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_trainable_head_still_gets_weight_grad(backend):
    """The frozen path is chosen only when weight and bias need no gradient."""
    require_backend(backend)
    h, w, b, labels = Case(bias=True, seed=80).make()
    hh, ww = leaf(h), leaf(w)
    fastpref.token_logprobs(hh, ww, labels, bias=b, backend=backend).sum().backward()
    assert ww.grad is not None and ww.grad.abs().sum() > 0


def test_native_frozen_head_memory():
    """Native CPU, frozen head, forward + backward: the scratch stays within the extension's documented bound,
    the saved expectations are two float32 [N, D], and together they are under 1/8 of the naive logits."""
    require_backend("native")
    if DEVICE.type != "cpu":
        pytest.skip("the CPU extension's scratch counter")
    mod = backends.resolve("native", DEVICE, torch.float32).cpu
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    try:
        N, D, V = 512, 32, 64000
        h, w, _, labels = Case(N=N, D=D, V=V, seed=81).make()
        hh = leaf(h)
        st = fastpref.token_stats(hh, w, labels, entropy=True, backend="native")
        scratch = mod.last_scratch_bytes()
        (st.logp.sum() + st.entropy.sum()).backward()
        bound = mod.scratch_bound_bytes(N, D, 0, V)
    finally:
        torch.set_num_threads(threads)
    saved = 2 * N * D * 4  # EA and EC
    assert 0 < scratch <= bound
    assert scratch + saved <= N * V * 4 / 8, (scratch, saved, N * V * 4)
    assert hh.grad is not None and torch.isfinite(hh.grad).all()
