"""Listwise losses vs naive float64 loops (catalog L07-K, L08-K, L35-L37, L39, L40)."""
import math

import pytest
import torch

from _ref import B, K, check, gen, lengths, logps, logsig, near, relu

import fastpref.losses as L


def inputs(seed, scale=3.0):
    g = gen(seed)
    ref = logps(g, B, K)
    return dict(logps=near(g, ref, scale), ref_logps=ref, rewards=torch.randn(B, K, generator=g, dtype=torch.float64))


def softmax(v):
    e = [math.exp(float(t)) for t in v]
    return [t / sum(e) for t in e]


def test_plackett_luce_scores_and_ranks():
    x = inputs(1)
    scores = x.pop("rewards")

    def ref(beta=0.1, scores=None, ranks=None, logps=None, ref_logps=None):
        out = []
        for b in range(B):
            key = (-scores[b]).tolist() if ranks is None else ranks[b].tolist()
            order = sorted(range(K), key=lambda i: key[i])
            s = [beta * (logps[b, i] - ref_logps[b, i]) for i in order]
            out.append(-sum(s[k] - torch.log(sum(torch.exp(s[j]) for j in range(k, K))) for k in range(K - 1)))
        return torch.stack(out)

    check(L.plackett_luce, ref, {**x, "scores": scores}, ("logps",), hp=dict(beta=0.5))
    ranks = torch.argsort(torch.argsort(-scores, -1), -1)
    check(L.plackett_luce, ref, {**x, "ranks": ranks}, ("logps",))
    with pytest.raises(ValueError, match="exactly one"):
        L.plackett_luce(**x)


def test_plackett_luce_k2_is_dpo():
    g = gen(2)
    lp, rf = logps(g, B, 2), logps(g, B, 2)
    pl = L.plackett_luce(logps=lp, ref_logps=rf, ranks=torch.tensor([[0, 1]] * B))
    dpo = L.sigmoid(chosen_logps=lp[:, 0], rejected_logps=lp[:, 1], ref_chosen_logps=rf[:, 0], ref_rejected_logps=rf[:, 1])
    torch.testing.assert_close(pl, dpo)


def test_pro():
    g = gen(3)
    x = dict(logps=logps(g, B, K), lengths=lengths(g, B, K), rewards=torch.randn(B, K, generator=g, dtype=torch.float64))

    def ref(sft_weight=2.0, logps=None, lengths=None, rewards=None):
        out = []
        for b in range(B):
            order = sorted(range(K), key=lambda i: -float(rewards[b, i]))
            s = [logps[b, i] / lengths[b, i] for i in order]
            r = [float(rewards[b, i]) for i in order]
            total = 0.0
            for k in range(K - 1):
                t = {i: r[k] - r[i] for i in range(k + 1, K)}
                tkk = max(t.values())
                total = total - s[k] * tkk + torch.log(torch.exp(s[k] * tkk) + sum(torch.exp(s[i] * t[i]) for i in t))
            out.append(total + sft_weight * (K - 1) ** 2 * -logps[b, order[0]])
        return torch.stack(out)

    check(L.pro, ref, x, ("logps",))
    check(L.pro, ref, x, ("logps",), hp=dict(sft_weight=0.0))


def test_lipo_lambda():
    x = inputs(4)
    labels = torch.tensor([[3, 1, 0, 2]] * (B // 2) + [[0, 0, 1, 2]] * (B - B // 2), dtype=torch.float64)
    x.pop("rewards")

    def ref(beta=0.1, relevance=None, logps=None, ref_logps=None):
        out = []
        for b in range(B):
            s = [beta * (logps[b, i] - ref_logps[b, i]) for i in range(K)]
            sv = [float(v.detach()) for v in s]
            rank = [1 + sum(sv[j] > sv[i] for j in range(K)) for i in range(K)]
            gain = [2 ** float(relevance[b, i]) - 1 for i in range(K)]
            tot = 0.0
            for i in range(K):
                for j in range(K):
                    if relevance[b, i] > relevance[b, j]:
                        w = abs(gain[i] - gain[j]) * abs(1 / math.log(1 + rank[i]) - 1 / math.log(1 + rank[j]))
                        tot = tot - w * logsig(s[i] - s[j])
            out.append(tot if torch.is_tensor(tot) else torch.tensor(tot, dtype=torch.float64))
        return torch.stack(out)

    check(L.lipo_lambda, ref, {**x, "relevance": labels}, ("logps",), hp=dict(beta=0.5))


def test_infonca_nca_exo_brain():
    x = inputs(5)

    def infonca(beta=0.1, alpha=1.0, logps=None, ref_logps=None, rewards=None):
        out = []
        for b in range(B):
            a = softmax(rewards[b] / alpha)
            z = beta * (logps[b] - ref_logps[b])
            out.append(-sum(a[i] * (z[i] - torch.log(torch.exp(z).sum())) for i in range(K)))
        return torch.stack(out)

    def nca(beta=0.1, alpha=1.0, logps=None, ref_logps=None, rewards=None):
        out = []
        for b in range(B):
            a = softmax(rewards[b] / alpha)
            z = beta * (logps[b] - ref_logps[b])
            out.append(-sum(a[i] * logsig(z[i]) + logsig(-z[i]) / K for i in range(K)))
        return torch.stack(out)

    def exo(beta=0.1, reward_temperature=1.0, logps=None, ref_logps=None, rewards=None):
        z = torch.exp(beta * (logps - ref_logps))
        q = z / z.sum(-1, keepdim=True)
        p = torch.tensor([softmax(rewards[b] / reward_temperature) for b in range(B)], dtype=torch.float64)
        return (q * torch.log(q / p)).sum(-1)

    check(L.infonca, infonca, x, ("logps",), hp=dict(beta=0.5, alpha=0.7))
    check(L.nca, nca, x, ("logps",), hp=dict(beta=0.5, alpha=0.7))
    check(L.exo, exo, x, ("logps",), hp=dict(beta=0.5, reward_temperature=2.0))

    g = gen(6)
    y = {**x, "proposal_logps": near(g, x["ref_logps"], 1.0)}

    def brain(reward_beta=1.0, logps=None, ref_logps=None, proposal_logps=None, rewards=None):
        a = torch.exp(rewards / reward_beta + ref_logps - proposal_logps)
        a = (a / a.sum(-1, keepdim=True)).detach()
        z = torch.exp(logps - proposal_logps)
        return -(a * torch.log(z / z.sum(-1, keepdim=True))).sum(-1)

    check(L.brain, brain, y, ("logps",), hp=dict(reward_beta=0.5))
    # BRAIn's gradient identity: dL/dlogp_i = -(alpha_i - beta_i) with beta = softmax(logp - log q)
    lp = y["logps"].clone().requires_grad_()
    (gr,) = torch.autograd.grad(L.brain(**{**y, "logps": lp}).sum(), lp)
    a = torch.softmax(y["rewards"] + y["ref_logps"] - y["proposal_logps"], -1)
    bb = torch.softmax(y["logps"] - y["proposal_logps"], -1)
    torch.testing.assert_close(gr, -(a - bb))


def test_rrhf():
    g = gen(7)
    x = dict(logps=logps(g, B, K), lengths=lengths(g, B, K), rewards=torch.randn(B, K, generator=g, dtype=torch.float64))

    def ref(sft_weight=1.0, logps=None, lengths=None, rewards=None):
        out = []
        for b in range(B):
            p = [logps[b, i] / lengths[b, i] for i in range(K)]
            rank = sum(relu(p[i] - p[j]) for i in range(K) for j in range(K) if rewards[b, i] < rewards[b, j])
            best = max(range(K), key=lambda i: float(rewards[b, i]))
            out.append(rank - sft_weight * logps[b, best])
        return torch.stack(out)

    check(L.rrhf, ref, x, ("logps",))
