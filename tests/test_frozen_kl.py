"""token_kl with a frozen policy head (its weight and bias need no gradient): the forward forms ∂KL/∂h (and
E_p[W] with labels) and the backward makes dL/dh with no pass over the vocabulary. Float64 gold, three-way,
both directions, every backend."""
from __future__ import annotations

import pytest
import torch

import fastpref
from cases import BACKENDS, DEVICE, Case, require_backend
from fastpref import backends
from oracle import assert_three_way, grads_of, leaf, naive_kl
from test_banned_tokens import _head, tiled  # noqa: F401 (tiled: the fixture)
from test_token_kl import CASES, _reference_model


def _no_vocabulary_backward(monkeypatch, backend):
    """Make any backward pass over the vocabulary fail loudly."""
    impl = backends.resolve(backend, DEVICE, torch.float32)

    def refuse(*a, **k):
        raise AssertionError("a frozen policy head must not run the backend's KL backward")

    monkeypatch.setattr(impl, "kl_backward", refuse)


def _compare(backend, h, w, b, rh, rw, rb, labels, ups, dtype, opts):
    """token_kl's values and d_hidden (policy head frozen) against float64 gold and the same-dtype reference."""
    hh = leaf(h)
    out = fastpref.token_kl(hh, w, rh, rw, labels, bias=b, ref_bias=rb, backend=backend, **opts)
    used = [out.kl] + ([out.logp] if labels is not None else [])
    got = grads_of(used, ups, [hh])[0]
    res = {}
    for tag, dt in (("gold", torch.float64), ("ref", dtype)):
        x = leaf(h, dt)
        vals = naive_kl(x, w.to(dt), None if b is None else b.to(dt), rh, rw, rb, labels, dtype=dt, **opts)
        res[tag] = vals, grads_of([v for v in vals[:2] if v is not None], ups, [x])[0]
    (gold, gold_g), (ref, ref_g) = res["gold"], res["ref"]
    assert_three_way("kl", out.kl, ref[0], gold[0], dtype)
    assert got.dtype == h.dtype
    assert_three_way("d_hidden", got, ref_g, gold_g, dtype, grad=True)
    if labels is not None and (labels == -100).any():
        assert (got[labels == -100] == 0).all()


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_policy_head_hidden_grad(backend, case, direction, monkeypatch):
    c, extra = CASES[case]
    if backend == "triton" and c.dtype == torch.bfloat16 and DEVICE.type != "cuda":
        pytest.skip("bf16 Triton arithmetic is unsupported by the interpreter; runs on GPUs")
    require_backend(backend, c.dtype)
    _no_vocabulary_backward(monkeypatch, backend)
    h, w, b, labels = c.make()
    rh, rw, rb = _reference_model(c, extra.get("ref_D"), extra.get("ref_scale"), extra.get("ref_bias", False))
    opts = dict(direction=direction, temperature=c.temperature, softcap=c.softcap,
                ref_softcap=extra.get("ref_softcap"))
    _compare(backend, h, w, b, rh, rw, rb, labels if extra.get("labels") else None, c.upstream(2), c.dtype, opts)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("softcap", [None, 3.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("tiled", BACKENDS, indirect=True)
def test_frozen_policy_head_with_banned_tokens(tiled, softcap, direction, monkeypatch):
    """−inf bias entries, a whole first tile of them; the model that may ban more does (the KL stays finite)."""
    _no_vocabulary_backward(monkeypatch, tiled)
    case, h, w, b, labels = _head(63, softcap, more=direction == "reverse")
    _, rh, rw, rb, _ = _head(64, softcap, more=direction == "forward")
    opts = dict(direction=direction, temperature=0.8, softcap=softcap, ref_softcap=softcap)
    _compare(tiled, h, w, b, rh, rw, rb, labels, case.upstream(2), torch.float32, opts)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_policy_head_identical_models(backend, direction, monkeypatch):
    """At the minimum (policy = reference) the frozen-head gradient vanishes too."""
    require_backend(backend)
    _no_vocabulary_backward(monkeypatch, backend)
    h, w, b, lab = Case(bias=True, softcap=10.0, seed=33).make()
    hh = leaf(h)
    out = fastpref.token_kl(hh, w, h, w, lab, bias=b, ref_bias=b, softcap=10.0, ref_softcap=10.0,
                            direction=direction, backend=backend)
    out.kl.sum().backward()
    assert hh.grad.abs().max() < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_trainable_policy_head_still_gets_weight_grad(backend):
    """The frozen path is chosen only when the policy's weight and bias need no gradient."""
    require_backend(backend)
    c = Case(bias=True, seed=34)
    h, w, b, lab = c.make()
    rh, rw, rb = _reference_model(c)
    hh, ww = leaf(h), leaf(w)
    fastpref.token_kl(hh, ww, rh, rw, lab, bias=b, backend=backend).kl.sum().backward()
    assert ww.grad is not None and ww.grad.abs().sum() > 0 and hh.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_policy_head_near_reference(backend, direction, dtype, monkeypatch):
    """A policy close to its reference (the KL-penalty regime, p ≈ q), where dKL/dh is small: the frozen path's
    d_hidden is as accurate as the same backend's vocabulary backward, not lost to the rounding of two nearly
    equal expectations (half-precision backends round the weights of their accumulating GEMMs)."""
    if backend == "triton" and dtype == torch.bfloat16 and DEVICE.type != "cuda":
        pytest.skip("bf16 Triton arithmetic is unsupported by the interpreter; runs on GPUs")
    require_backend(backend, dtype)
    c = Case(N=40, D=32, V=600, dtype=dtype, bias=True, softcap=20.0, seed=95)
    h, w, b, _ = c.make()
    g = torch.Generator().manual_seed(96)
    rh = (h.double() + 0.02 * torch.randn(h.shape, generator=g, dtype=torch.float64).to(DEVICE)).to(dtype)
    opts = dict(direction=direction, softcap=20.0, ref_softcap=20.0)
    up = c.upstream(1)

    def d_hidden(x, weight, dt=None):
        if dt is None:
            kl = fastpref.token_kl(x, weight, rh, w, bias=b, ref_bias=b, backend=backend, **opts).kl
        else:
            kl = naive_kl(x, weight, b.to(dt), rh, w, b, None, dtype=dt, **opts)[0]
        return grads_of([kl], up, [x])[0].double()

    vocab = d_hidden(leaf(h), leaf(w))  # the weight needs a gradient: the vocabulary backward
    gold = d_hidden(leaf(h, torch.float64), w.double(), torch.float64)
    _no_vocabulary_backward(monkeypatch, backend)
    frozen = d_hidden(leaf(h), w)
    err, vocab_err = (frozen - gold).norm(), (vocab - gold).norm()
    assert err <= 2 * vocab_err + 1e-5 * gold.norm(), (float(err), float(vocab_err), float(gold.norm()))
