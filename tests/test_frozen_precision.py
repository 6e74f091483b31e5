"""Frozen heads in half precision for confident tokens: the label's term stays exact.

The backward of a frozen head is g·((dz/dx)_y·W_y − E_p[(dz/dx)·W]) (``fastpref._frozen``). When p_y is near 1
the two terms nearly cancel; with a temperature or a softcap (dz/dx ≠ 1) a weight tile rounded to fp16/bf16
would put the label's rounding error, about ulp(dz/dx)·|W_y|, into a difference of size (1 − p_y)·|W_y|. The
cases plant a label margin per row so that p_y spreads over [0.9, 1) and compare, per p_y band, against float64
gold computed the naive way (three-way, the tolerance relative to the band's own gradients).
"""
from __future__ import annotations

import pytest
import torch

import fastpref
from cases import DEVICE, require_backend
from fastpref import _frozen, backends
from fastpref.options import LogitOptions
from oracle import assert_three_way, grads_of, leaf, naive_kl, naive_stats

BANDS = ((0.9, 0.99), (0.99, 0.999), (0.999, 1.0))
SETTINGS = {"temp0.7": dict(temperature=0.7, softcap=None), "softcap30": dict(temperature=1.0, softcap=30.0),
            "softcap30_temp0.7": dict(temperature=0.7, softcap=30.0)}


def confident_case(dtype: torch.dtype, temperature: float, softcap: float | None, seed: int = 7, N: int = 96,
                   D: int = 64, V: int = 300):
    """(h [N, D], w [V, D] in ``dtype``, labels [N]): row i's transformed label logit z_y sits a margin above its
    largest logit, margins spread over [2, 12] so that p_y covers every band."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) / D ** 0.5
    labels = torch.randint(0, V, (N,), generator=g)
    x = h @ w.T
    cap = softcap
    z_max = (x if cap is None else cap * torch.tanh(x / cap)).max(1).values / temperature
    z_y = z_max + torch.linspace(2.0, 12.0, N, dtype=torch.float64)
    x_y = z_y * temperature if cap is None else cap * torch.atanh(z_y * temperature / cap)
    wy = w[labels]
    h = h + ((x_y - x.gather(1, labels[:, None]).squeeze(1)) / (wy * wy).sum(1))[:, None] * wy
    return h.to(DEVICE, dtype), w.to(DEVICE, dtype), labels.to(DEVICE)


def _direct_triton_bf16(h, w, labels, opts: dict, up):
    """The frozen op's forward and backward called on the backend directly: the interpreter cannot do bfloat16
    arithmetic, so ``supports`` refuses it, but the frozen path computes only on float32 products and writes
    bfloat16 weight tiles (the part under test)."""
    impl = backends.resolve("triton", DEVICE, torch.float32)  # the same object serves every dtype
    o = LogitOptions(**opts)
    logp, lse, _, _, ea, _ = impl.stats_forward_frozen(h, w, None, labels, o, False, False)
    g = up.float()
    return _frozen.hidden_grad(w, labels, logp, lse, ea, None, g, torch.zeros_like(g), None, o)


def _per_band(name, got, ref, gold, p_y, dtype):
    """Three-way per p_y band (each band's tolerance scaled by its own largest gradient); every band is checked
    and the failures are reported together."""
    failures = []
    for lo, hi in BANDS:
        sel = (p_y >= lo) & (p_y < hi)
        assert int(sel.sum()) >= 3, f"the case has too few rows with p_y in [{lo}, {hi})"
        try:
            assert_three_way(f"{name} p_y in [{lo}, {hi})", got[sel], ref[sel], gold[sel], dtype, grad=True)
        except AssertionError as e:
            failures.append(str(e).splitlines()[0])
    assert not failures, "; ".join(failures)


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", ["torch", "triton", "native"])
def test_frozen_head_confident_tokens(backend, dtype, setting):
    """token_stats's dL/dh with a frozen head for p_y in [0.9, 1), half inputs, T ≠ 1 or a softcap."""
    opts = SETTINGS[setting]
    h, w, labels = confident_case(dtype, **opts)
    up = torch.randn(h.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(DEVICE)
    if backend == "triton" and dtype == torch.bfloat16 and DEVICE.type == "cpu":
        require_backend("triton")
        got = _direct_triton_bf16(h, w, labels, opts, up)
    else:
        require_backend(backend, dtype)
        hh = leaf(h)
        got = grads_of([fastpref.token_stats(hh, w, labels, backend=backend, **opts).logp], [up], [hh])[0]
    gold_h, ref_h = leaf(h, torch.float64), leaf(h)
    gold_logp = naive_stats(gold_h, w.double(), None, labels, **opts)[0]
    gold = grads_of([gold_logp], [up], [gold_h])[0]
    ref = grads_of([naive_stats(ref_h, w, None, labels, dtype=dtype, **opts)[0]], [up], [ref_h])[0]
    _per_band("d_hidden", got, ref, gold, gold_logp.detach().exp(), dtype)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("backend", ["torch", "triton", "native"])
def test_frozen_policy_confident_tokens(backend, direction):
    """token_kl with labels and a frozen policy head, fp16 at T = 0.7: dL/dh of the policy's log-probs per band
    (the forward direction accumulates E_q[s·W] and E_p[s·W] − E_q[s·W], the reverse E_p[s·W] directly)."""
    opts = SETTINGS["temp0.7"]
    require_backend(backend, torch.float16)
    h, w, labels = confident_case(torch.float16, **opts)
    rh, rw, _ = confident_case(torch.float16, **opts, seed=8)
    # Upstream on logp only: the KL's own gradient (of size |W|) would hide the (1 − p_y)-sized label term.
    up = [torch.zeros(h.shape[0], dtype=torch.float64, device=DEVICE),
          torch.randn(h.shape[0], generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(DEVICE)]
    hh = leaf(h)
    out = fastpref.token_kl(hh, w, rh, rw, labels, direction=direction, backend=backend, **opts)
    got = grads_of([out.kl, out.logp], up, [hh])[0]
    grads = []
    for dt in (torch.float64, torch.float16):
        x = leaf(h, dt)
        kl, logp, _ = naive_kl(x, w.to(dt), None, rh.to(dt), rw.to(dt), None, labels, direction=direction,
                               dtype=dt, **opts)
        grads.append(grads_of([kl, logp], up, [x])[0])
    p_y = naive_stats(h.double(), w.double(), None, labels, **opts)[0].exp()
    _per_band("d_hidden", got, grads[1], grads[0], p_y, torch.float16)
