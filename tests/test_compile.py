"""The fused ops inside torch.compile: custom ops with fake functions, no graph breaks in the core."""
from __future__ import annotations

import pytest
import torch

import fastpref
from fastpref import backends
from fastpref._ops import token_stats_op

from cases import Case


def _inputs(seed=40):
    h, w, b, y = Case(N=33, D=16, V=70, bias=True, ignore_frac=0.3, seed=seed).make()
    return h, w, b, y


def test_custom_op_fullgraph_forward_backward():
    h, w, b, y = _inputs()
    y = y.clamp(min=0)

    def f(h, w, b):
        logp, lse, ent, _ = token_stats_op(h, w, b, y, "torch", 1.0, None, True, False)
        return (logp * 2 + lse - ent).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    xs = [x.clone().requires_grad_() for x in (h, w, b)]
    ref = [x.clone().requires_grad_() for x in (h, w, b)]
    compiled(*xs).backward()
    f(*ref).backward()
    for a, r in zip(xs, ref):
        torch.testing.assert_close(a.grad, r.grad)


@pytest.mark.parametrize("fullgraph", [True, False])
def test_public_api_compiles(fullgraph):
    """Under compile, ignored rows are masked instead of removed (no data-dependent shapes)."""
    h, w, b, y = _inputs(41)

    def loss(h, w, b):
        st = fastpref.token_stats(h, w, y, bias=b, entropy=True, softcap=5.0, backend="torch")
        kl = fastpref.token_kl(h, w, h.flip(0), w, y, backend="torch")
        return st.logp.sum() - 0.1 * st.entropy.sum() + kl.kl.sum()

    compiled = torch.compile(loss, fullgraph=fullgraph, backend="aot_eager")
    xs = [x.clone().requires_grad_() for x in (h, w, b)]
    ref = [x.clone().requires_grad_() for x in (h, w, b)]
    out = compiled(*xs)
    expected = loss(*ref)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.backward()
    expected.backward()
    for a, r in zip(xs, ref):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-5, atol=1e-6)
    assert (xs[0].grad[y == -100] == 0).all()


def test_frozen_heads_compile_fullgraph(monkeypatch):
    """Frozen heads (only hidden needs a gradient) take the frozen ops of token_stats and token_kl: they compile
    without graph breaks, match eager and run no backward pass over the vocabulary."""
    h, w, b, y = _inputs(42)
    impl = backends.resolve("torch", h.device, h.dtype)
    for name in ("stats_backward", "kl_backward"):
        monkeypatch.setattr(impl, name, lambda *a, **k: pytest.fail("a vocabulary backward ran for a frozen head"))

    def loss(h):
        st = fastpref.token_stats(h, w, y, bias=b, entropy=True, softcap=5.0, backend="torch")
        kl = fastpref.token_kl(h, w, h.detach().flip(0), w, y, bias=b, direction="reverse", backend="torch")
        return st.logp.sum() - 0.1 * st.entropy.sum() + kl.kl.sum() + kl.logp.sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    x, r = h.clone().requires_grad_(), h.clone().requires_grad_()
    out, expected = compiled(x), loss(r)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.backward()
    expected.backward()
    torch.testing.assert_close(x.grad, r.grad, rtol=1e-5, atol=1e-6)
    assert (x.grad[y == -100] == 0).all()
