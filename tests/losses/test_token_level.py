"""TDPO1/2, TGDPO, Nash-MD, WPO weights, k1/k2/k3 vs naive per-token loops in float64 (L16, L19, L20, L31, K1)."""
import torch

from _ref import B, T, check, gen, logsig

import fastpref.losses as L


def tok(g, scale=1.0):
    return -scale * torch.rand(B, T, generator=g, dtype=torch.float64) * 3


def masks(g):
    n = torch.randint(1, T + 1, (B,), generator=g)
    start = torch.randint(0, 2, (B,), generator=g)  # some sequences have a masked prompt token
    pos = torch.arange(T)
    return ((pos >= start[:, None]) & (pos < (start + n).clamp(max=T)[:, None])).to(torch.int64)


def tsum(x, m):  # naive masked sum with python loops
    return torch.stack([sum(x[b, t] * m[b, t] for t in range(T)) for b in range(B)])


def tdpo_inputs(seed):
    g = gen(seed)
    return dict(chosen_token_logps=tok(g), rejected_token_logps=tok(g), ref_chosen_token_logps=tok(g),
                ref_rejected_token_logps=tok(g), chosen_token_kl=torch.rand(B, T, generator=g, dtype=torch.float64),
                rejected_token_kl=torch.rand(B, T, generator=g, dtype=torch.float64), chosen_mask=masks(g),
                rejected_mask=masks(g))


TDPO_GRADS = ("chosen_token_logps", "rejected_token_logps", "chosen_token_kl", "rejected_token_kl")


def test_tdpo1_tdpo2():
    x = tdpo_inputs(1)

    def ref(beta=0.1, alpha=None, **kw):
        mw, ml = kw["chosen_mask"], kw["rejected_mask"]
        delta = tsum(kw["chosen_token_logps"] - kw["ref_chosen_token_logps"], mw) - tsum(
            kw["rejected_token_logps"] - kw["ref_rejected_token_logps"], ml)
        dw, dl = tsum(kw["chosen_token_kl"], mw), tsum(kw["rejected_token_kl"], ml)
        if alpha is None:  # TDPO1
            return -logsig(beta * (delta - (dl - dw)))
        return -logsig(beta * (delta - alpha * (dl - dw.detach())))

    check(L.tdpo1, ref, x, TDPO_GRADS, hp=dict(beta=0.5))
    check(L.tdpo2, ref, x, TDPO_GRADS, hp=dict(beta=0.5, alpha=0.3))
    check(L.tdpo2, ref, x, TDPO_GRADS, hp={}, ref_hp=dict(alpha=0.5))
    # TDPO2: no gradient reaches the chosen KL
    kl, lw = x["chosen_token_kl"].clone().requires_grad_(), x["chosen_token_logps"].clone().requires_grad_()
    out = L.tdpo2(**{**x, "chosen_token_kl": kl, "chosen_token_logps": lw})
    gk, _ = torch.autograd.grad(out.sum(), (kl, lw), allow_unused=True)
    assert gk is None


def test_tgdpo():
    g = gen(2)
    x = dict(chosen_token_logps=tok(g), rejected_token_logps=tok(g), ref_chosen_token_logps=tok(g),
             ref_rejected_token_logps=tok(g), rm_chosen_token_logps=tok(g, 4.0), rm_rejected_token_logps=tok(g, 4.0),
             chosen_mask=masks(g), rejected_mask=masks(g))

    def ref(beta=0.1, alpha=0.5, **kw):
        rw = kw["rm_chosen_token_logps"] - kw["ref_chosen_token_logps"]
        rl = kw["rm_rejected_token_logps"] - kw["ref_rejected_token_logps"]
        sw = tsum((beta * (1 + alpha * beta * rw)).detach() * (kw["chosen_token_logps"] - kw["ref_chosen_token_logps"]),
                  kw["chosen_mask"])
        sl = tsum((beta * (1 - alpha * beta * rl)).detach() * (kw["rejected_token_logps"] - kw["ref_rejected_token_logps"]),
                  kw["rejected_mask"])
        return -logsig(sw - sl)

    check(L.tgdpo, ref, x, ("chosen_token_logps", "rejected_token_logps", "rm_chosen_token_logps"))
    check(L.tgdpo, ref, x, ("chosen_token_logps", "rejected_token_logps"), hp=dict(beta=1.0, alpha=2.0))


def test_nash_md():
    g = gen(3)
    x = dict(token_logps=tok(g), ref_token_logps=tok(g), probability=torch.rand(B, generator=g, dtype=torch.float64),
             mask=masks(g))

    def ref(beta=0.1, token_logps=None, ref_token_logps=None, probability=None, mask=None):
        kl = tsum((token_logps - ref_token_logps).detach() * token_logps, mask)
        return beta * kl - (probability - 0.5) * tsum(token_logps, mask)

    check(L.nash_md, ref, x, ("token_logps",), hp=dict(beta=0.2))


def test_wpo_weights():
    g = gen(4)
    z = torch.randn(B, T, 11, generator=g, dtype=torch.float64)
    y = torch.randint(0, 11, (B, T), generator=g)
    p = torch.exp(z) / torch.exp(z).sum(-1, keepdim=True)
    lp = torch.log(p.gather(-1, y[..., None]).squeeze(-1))
    log_sum_p2 = torch.log((p ** 2).sum(-1))
    m = masks(g)
    exp = torch.exp(tsum(lp - log_sum_p2, m) / m.sum(-1))
    torch.testing.assert_close(L.wpo_weights(lp, torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1), m), exp)
    torch.testing.assert_close(L.wpo_weights(lp.float(), log_sum_p2.float(), m).double(), exp, rtol=1e-5, atol=0)
    assert not L.wpo_weights(lp.requires_grad_(), log_sum_p2, m).requires_grad


def test_kl_estimators():
    g = gen(5)
    x = dict(logps=tok(g), ref_logps=tok(g))
    r = lambda kw: kw["logps"] - kw["ref_logps"]  # noqa: E731
    check(L.k1, lambda **kw: r(kw), x, ("logps",))
    check(L.k2, lambda **kw: 0.5 * r(kw) ** 2, x, ("logps",))
    check(L.k3, lambda **kw: torch.exp(-r(kw)) + r(kw) - 1, x, ("logps",))
    # k1 and k3 are unbiased for KL(p || q) under samples from p
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
    kl = (p * (p.log() - q.log())).sum()
    for k in (L.k1, L.k3):
        torch.testing.assert_close((p * k(logps=p.log(), ref_logps=q.log())).sum(), kl)
