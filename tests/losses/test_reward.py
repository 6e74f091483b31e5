"""Reward-model losses vs naive float64 formulas (catalog R1-R5)."""
import math

import pytest
import torch

from _ref import B, check, gen, logsig, sig

import fastpref.losses as L

R = ("chosen_rewards", "rejected_rewards")


def rewards(seed, h=None):
    g = gen(seed)
    shape = (B,) if h is None else (B, h)
    return dict(chosen_rewards=2 * torch.randn(*shape, generator=g, dtype=torch.float64),
                rejected_rewards=2 * torch.randn(*shape, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("hp", [{}, dict(margin=0.5), dict(tau=0.5, label_smoothing=0.1),
                                dict(center_rewards_coefficient=0.01, margin=torch.linspace(0, 1, B, dtype=torch.float64))])
def test_bt(hp):
    def ref(chosen_rewards=None, rejected_rewards=None, margin=0.0, tau=1.0, label_smoothing=0.0,
            center_rewards_coefficient=0.0):
        x = (chosen_rewards - rejected_rewards - margin) / tau
        e = label_smoothing
        return -(1 - e) * logsig(x) - e * logsig(-x) + center_rewards_coefficient * (chosen_rewards + rejected_rewards) ** 2

    x = rewards(1)
    if torch.is_tensor(hp.get("margin")):
        hp = dict(hp)
        x["margin"] = hp.pop("margin")
    check(L.bt, ref, x, R, hp=hp)


def test_scaled_bt_regression_lsc_micro():
    x = rewards(2)
    m = torch.tensor([1.0, -2.0, 3.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    check(L.scaled_bt, lambda strength=None, **kw: -abs(strength) * logsig(kw["chosen_rewards"] - kw["rejected_rewards"]),
          {**x, "strength": m}, R)
    g = gen(3)
    pred, tgt = torch.randn(B, 3, generator=g, dtype=torch.float64), torch.randn(B, 3, generator=g, dtype=torch.float64)
    check(L.regression, lambda predictions=None, targets=None: ((predictions - targets) ** 2).sum(-1),
          dict(predictions=pred, targets=tgt), ("predictions",))
    check(L.lsc, lambda rewards=None, ref_rewards=None: torch.log(sig(rewards - ref_rewards)).sum(-1),
          dict(rewards=pred, ref_rewards=tgt), ("rewards",))
    y = rewards(4, h=3)
    y["router_logits"] = torch.randn(B, 3, generator=g, dtype=torch.float64)

    def micro(chosen_rewards=None, rejected_rewards=None, router_logits=None):
        w = torch.exp(router_logits) / torch.exp(router_logits).sum(-1, keepdim=True)
        return -torch.log((w * sig(chosen_rewards - rejected_rewards)).sum(-1))

    check(L.micro, micro, y, R + ("router_logits",))


@pytest.mark.parametrize("k,gated", [(2, False), (4, True), (6, False)])
def test_gpm(k, gated):
    g = gen(5)
    x = dict(chosen_embeddings=torch.randn(B, k, generator=g, dtype=torch.float64),
             rejected_embeddings=torch.randn(B, k, generator=g, dtype=torch.float64))
    if gated:
        x["gates"] = torch.softmax(torch.randn(B, k // 2, generator=g, dtype=torch.float64), -1) * (k / 2)

    def ref(chosen_embeddings=None, rejected_embeddings=None, gates=None, margin=0.0, tau=0.1):
        # the GPM code's (v_i @ R^T) . v_j with R[2b, 2b+1] = -1, R[2b+1, 2b] = 1, gates scaling the blocks
        r = torch.zeros(k, k, dtype=torch.float64)
        for b in range(k // 2):
            r[2 * b, 2 * b + 1], r[2 * b + 1, 2 * b] = -1.0, 1.0
        lam = torch.ones(B, k // 2, dtype=torch.float64) if gates is None else gates
        lam = lam.repeat_interleave(2, -1)
        s = ((chosen_embeddings @ r.T) * lam * rejected_embeddings).sum(-1)
        return -logsig((s - margin) / tau)

    check(L.gpm, ref, x, ("chosen_embeddings", "rejected_embeddings"), hp=dict(tau=1.0 if k == 2 else 0.1))
    v, w = x["chosen_embeddings"], x["rejected_embeddings"]
    torch.testing.assert_close(L.gpm_score(v, w), -L.gpm_score(w, v))  # skew-symmetric
    with pytest.raises(ValueError, match="even"):
        L.gpm_score(torch.zeros(2, 3), torch.zeros(2, 3))
    assert math.isclose(float(L.gpm(chosen_embeddings=v[:1], rejected_embeddings=v[:1], tau=1.0)), math.log(2))
