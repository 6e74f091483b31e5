"""TRL DPOTrainer loss types vs naive float64 formulas from the catalog (L01-L11, L15, L17)."""
import math

import pytest
import torch

from _ref import B, check, gen, lengths, logsig, pair, relu, sig

import fastpref.losses as L

P = ("chosen_logps", "rejected_logps")


def hs(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps):
    return chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps


def score(h, f="reverse_kl", a=0.5):
    if f == "reverse_kl":
        return h
    if f == "forward_kl":  # f'(u) = 1 - 1/u
        return 1.0 - 1.0 / torch.exp(h)
    if f == "js_divergence":  # f'(u) = log(2u/(1+u))
        u = torch.exp(h)
        return torch.log(2 * u / (1 + u))
    ap = 1.0 - a  # paper / TRL v0.19 form (1 - u^-α')/α' with α' = 1 - α_trl
    return (1.0 - torch.exp(h) ** (-ap)) / ap


def d(f="reverse_kl", a=0.5, **kw):
    hw, hl = hs(**kw)
    return score(hw, f, a) - score(hl, f, a)


def ref_sigmoid(beta=0.1, label_smoothing=0.0, soft_labels=None, **kw):
    x = beta * d(**kw)
    eps = label_smoothing if soft_labels is None else 1 - soft_labels
    return -(1 - eps) * logsig(x) - eps * logsig(-x)


FDIVS = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.3),
         ("alpha_divergence", 0.8)]


@pytest.mark.parametrize("f,a", FDIVS)
@pytest.mark.parametrize("beta,ls", [(0.1, 0.0), (0.5, 0.2)])
def test_sigmoid_fdiv(f, a, beta, ls):
    x = pair(1, scale=1.0)
    check(L.sigmoid, lambda **kw: ref_sigmoid(beta=beta, label_smoothing=ls, f=f, a=a, **kw), x, P,
          hp=dict(beta=beta, label_smoothing=ls, f_divergence_type=f, f_alpha_divergence_coef=a), ref_hp={})


def test_sigmoid_soft_labels():
    x = pair(2)
    p = torch.rand(B, generator=gen(3), dtype=torch.float64)
    check(L.sigmoid, lambda **kw: ref_sigmoid(beta=0.2, **kw), {**x, "soft_labels": p}, P, hp=dict(beta=0.2),
          ref_hp={})


def test_sigmoid_default_is_dpo_and_bounded_below():
    x = pair(4)
    hw, hl = hs(**x)
    torch.testing.assert_close(L.sigmoid(**x), -logsig(0.1 * (hw - hl)))
    big = {**x, "chosen_logps": x["chosen_logps"] + 1e3}
    h = -(0.8 * torch.log(torch.tensor(0.8)) + 0.2 * torch.log(torch.tensor(0.2))).double()
    assert (L.sigmoid(**big, label_smoothing=0.2) >= h - 1e-6).all()


def _ref(name):
    def robust(beta=0.1, label_smoothing=0.0, **kw):
        x, e = beta * d(**kw), label_smoothing
        return ((1 - e) * -logsig(x) - e * -logsig(-x)) / (1 - 2 * e)

    def exo_pair(beta=0.1, label_smoothing=1e-3, **kw):
        x, e = beta * d(**kw), label_smoothing
        q = sig(x)
        return q * (torch.log(q) - math.log(1 - e)) + sig(-x) * (logsig(-x) - math.log(e))

    def nca_pair(beta=0.1, **kw):
        hw, hl = hs(**kw)
        return -logsig(beta * hw) - 0.5 * logsig(-beta * hw) - 0.5 * logsig(-beta * hl)

    def bco_pair(beta=0.1, delta=0.0, **kw):
        hw, hl = hs(**kw)
        return -logsig(beta * hw - delta) - logsig(-(beta * hl - delta))

    def sppo_hard(beta=0.1, **kw):
        hw, hl = hs(**kw)
        return (hw - 1 / (2 * beta)) ** 2 + (hl + 1 / (2 * beta)) ** 2

    def apo_zero(beta=0.1, **kw):
        hw, hl = hs(**kw)
        return 1 - sig(beta * hw) + sig(beta * hl)

    def apo_down(beta=0.1, **kw):
        hw, hl = hs(**kw)
        return sig(beta * hw) + 1 - sig(beta * (hw - hl))

    def discopop(beta=0.1, discopop_tau=0.05, **kw):
        x = beta * d(**kw)
        w = sig(x / discopop_tau)
        return (1 - w) * -logsig(x) + w * torch.exp(-x)

    def hinge(beta=0.1, **kw):
        return relu(1 - beta * d(**kw))

    return dict(robust=robust, exo_pair=exo_pair, nca_pair=nca_pair, bco_pair=bco_pair, sppo_hard=sppo_hard,
                apo_zero=apo_zero, apo_down=apo_down, discopop=discopop, hinge=hinge)[name]


@pytest.mark.parametrize("name,hp", [
    ("robust", dict(label_smoothing=0.1)), ("robust", dict(beta=0.3)), ("exo_pair", dict(label_smoothing=1e-3)),
    ("exo_pair", dict(label_smoothing=0.2, beta=0.5)), ("nca_pair", {}), ("bco_pair", {}),
    ("bco_pair", dict(delta=0.3)), ("sppo_hard", {}), ("apo_zero", {}), ("apo_down", dict(beta=0.2)),
    ("discopop", {}), ("discopop", dict(discopop_tau=0.5, beta=0.3)), ("hinge", dict(beta=0.2)),
])
def test_pairwise_values_and_grads(name, hp):
    check(L.get(name), _ref(name), pair(5, scale=8.0), P, hp=hp)


def test_robust_is_unbounded_below_with_expected_slope():
    x = pair(0)
    e, beta = 0.1, 0.1
    for big in (1e3, 1e4):
        cw = (x["chosen_logps"] + big).requires_grad_()
        out = L.robust(**{**x, "chosen_logps": cw}, label_smoothing=e, beta=beta)
        (g,) = torch.autograd.grad(out.sum(), cw)
        torch.testing.assert_close(g, torch.full_like(g, -e * beta / (1 - 2 * e)))


@pytest.mark.parametrize("name", ["ipo", "sigmoid_norm"])
@pytest.mark.parametrize("f,a", FDIVS)
def test_length_normalised(name, f, a):
    g = gen(6)
    x = {**pair(6, scale=2.0), "chosen_lengths": lengths(g, B), "rejected_lengths": lengths(g, B)}
    x["rejected_lengths"][0] = 0  # clamped to 1

    def ref(beta=0.1, chosen_lengths=None, rejected_lengths=None, **kw):
        hw, hl = hs(**kw)
        dd = score(hw, f, a) / chosen_lengths.clamp(min=1) - score(hl, f, a) / rejected_lengths.clamp(min=1)
        return (dd - 1 / (2 * beta)) ** 2 if name == "ipo" else -logsig(beta * dd)

    check(L.get(name), ref, x, P, hp=dict(beta=0.2, f_divergence_type=f, f_alpha_divergence_coef=a),
          ref_hp=dict(beta=0.2))


def test_aot_sorts_across_batch():
    x = pair(7, scale=5.0)

    def ref(beta=0.1, label_smoothing=0.0, **kw):
        pol = torch.sort(kw["chosen_logps"] - kw["rejected_logps"]).values
        rf = torch.sort(kw["ref_chosen_logps"] - kw["ref_rejected_logps"]).values
        z = beta * (pol - rf)
        return -(1 - label_smoothing) * logsig(z) - label_smoothing * logsig(-z)

    def ref_unpaired(beta=0.1, label_smoothing=0.0, **kw):
        hw, hl = hs(**kw)
        z = beta * (torch.sort(hw).values - torch.sort(hl).values)
        return -(1 - label_smoothing) * logsig(z) - label_smoothing * logsig(-z)

    for hp in ({}, dict(label_smoothing=0.1, beta=0.4)):
        check(L.aot, ref, x, P, hp=hp)
        check(L.aot_unpaired, ref_unpaired, x, P, hp=hp)


def test_f_divergence_alpha_conventions():
    h = torch.linspace(-5, 5, 11, dtype=torch.float64)
    # TRL alpha=0.2 is the paper's alpha'=0.8 (same function); alpha -> 1 is reverse KL
    torch.testing.assert_close(L.f_divergence_scores(h, "alpha_divergence", 0.2), score(h, "alpha", 0.2))
    torch.testing.assert_close(L.f_divergence_scores(h, "forward_kl"), 1 - torch.exp(-h))
    torch.testing.assert_close(L.f_divergence_scores(h, "alpha_divergence", 1.0), h)
    with pytest.raises(ValueError, match="f_divergence_type"):
        L.f_divergence_scores(h, "hellinger")
