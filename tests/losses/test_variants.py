"""DPO variants (catalog L12-L15, L18, L26-L28, L30, L32, L33) and sft/combine vs naive float64 formulas."""
import pytest
import torch

from _ref import B, check, gen, lengths, logps, logsig, near, pair

import fastpref.losses as L

P = ("chosen_logps", "rejected_logps")


def hs(kw, ref="ref"):
    return kw["chosen_logps"] - kw[f"{ref}_chosen_logps"], kw["rejected_logps"] - kw[f"{ref}_rejected_logps"]


def prev(x, seed):
    g = gen(seed)
    return {"chosen_logps": x["chosen_logps"], "rejected_logps": x["rejected_logps"],
            "prev_chosen_logps": near(g, x["chosen_logps"], 0.01), "prev_rejected_logps": near(g, x["rejected_logps"], 0.01)}


def test_dpop_penalty_inside_logsigmoid():
    x = pair(1, scale=2.0)

    def ref(beta=0.1, dpop_lambda=50.0, **kw):
        hw, hl = hs(kw)
        pen = torch.clamp(kw["ref_chosen_logps"] - kw["chosen_logps"], min=0)
        return -logsig(beta * (hw - hl - dpop_lambda * pen))

    check(L.dpop, ref, x, P)
    check(L.dpop, ref, x, P, hp=dict(beta=0.3, dpop_lambda=5.0))


def test_rdpo_length_regularised():
    g = gen(2)
    x = {**pair(2), "chosen_lengths": lengths(g, B), "rejected_lengths": lengths(g, B)}

    def ref(beta=0.1, alpha=None, chosen_lengths=None, rejected_lengths=None, **kw):
        hw, hl = hs(kw)
        return -logsig(beta * (hw - hl) - alpha * (chosen_lengths - rejected_lengths))

    check(L.rdpo, ref, x, P, hp=dict(alpha=0.02))


def test_ld_dpo_matches_reweighted_dpo():
    g = gen(3)
    parts = {f"{p}{s}_{k}_logps": logps(g, B) / 2 for p in ("", "ref_") for s in ("chosen", "rejected")
             for k in ("shared", "tail")}

    def ref(ld_alpha=None, beta=0.1, label_smoothing=0.0, **kw):
        m = {n: kw[f"{n}_shared_logps"] + ld_alpha * kw[f"{n}_tail_logps"]
             for n in ("chosen", "rejected", "ref_chosen", "ref_rejected")}
        z = beta * ((m["chosen"] - m["ref_chosen"]) - (m["rejected"] - m["ref_rejected"]))
        return -(1 - label_smoothing) * logsig(z) - label_smoothing * logsig(-z)

    grads = ("chosen_shared_logps", "chosen_tail_logps", "rejected_shared_logps", "rejected_tail_logps")
    check(L.ld_dpo, ref, parts, grads, hp=dict(ld_alpha=0.5))
    check(L.ld_dpo, ref, parts, grads, hp=dict(ld_alpha=0.0, beta=0.3, label_smoothing=0.1))


def test_cal_dpo_and_flex_dpo():
    x = pair(4, scale=1.0)

    def cal(beta=0.1, **kw):
        hw, hl = hs(kw)
        return -logsig(hw - hl) + (hw - 1 / (2 * beta)) ** 2 + (hl + 1 / (2 * beta)) ** 2

    def flex(beta_chosen=0.1, beta_rejected=0.1, **kw):
        hw, hl = hs(kw)
        return -logsig(beta_chosen * hw - beta_rejected * hl)

    check(L.cal_dpo, cal, x, P, hp=dict(beta=0.5))
    check(L.flex_dpo, flex, x, P, hp=dict(beta_chosen=0.1, beta_rejected=0.4))


def test_sppo_soft_and_gpo():
    x = prev(pair(5), 5)
    g = gen(6)
    pw, pl = 0.5 + 0.5 * torch.rand(B, generator=g, dtype=torch.float64), 0.5 * torch.rand(B, generator=g, dtype=torch.float64)

    def ref(beta=0.001, chosen_winrates=None, rejected_winrates=None, **kw):
        hw, hl = hs(kw, "prev")
        return 0.5 * ((hw - (chosen_winrates - 0.5) / beta) ** 2 + (hl - (rejected_winrates - 0.5) / beta) ** 2)

    check(L.sppo, ref, {**x, "chosen_winrates": pw, "rejected_winrates": pl}, P)

    def ref_gpo(beta=0.001, chosen_scores=None, rejected_scores=None, **kw):
        return ref(beta, chosen_scores + 0.5, rejected_scores + 0.5, **kw)

    check(L.gpo, ref_gpo, {**x, "chosen_scores": pw - 0.5, "rejected_scores": pl - 0.5}, P, hp=dict(beta=0.01))
    # hard win-rates: soft SPPO is half of TRL's sppo_hard (reference = previous iterate)
    y = {**pair(7), "chosen_winrates": torch.ones(B, dtype=torch.float64), "rejected_winrates": torch.zeros(B, dtype=torch.float64)}
    soft = L.sppo(**{k.replace("ref_", "prev_"): v for k, v in y.items()}, beta=0.1)
    hard = L.sppo_hard(**{k: v for k, v in y.items() if "winrates" not in k}, beta=0.1)
    torch.testing.assert_close(2 * soft, hard)


def test_inpo():
    g = gen(8)
    x = {**pair(8), "prev_chosen_logps": logps(g, B), "prev_rejected_logps": logps(g, B)}

    def ref(tau=None, eta=None, **kw):
        gg = ((kw["chosen_logps"] - kw["rejected_logps"]) - tau / eta * (kw["ref_chosen_logps"] - kw["ref_rejected_logps"])
              - (eta - tau) / eta * (kw["prev_chosen_logps"] - kw["prev_rejected_logps"]))
        return (gg - 1 / (2 * eta)) ** 2

    check(L.inpo, ref, x, P, hp=dict(tau=0.05, eta=0.2))


def test_online_ipo():
    g = gen(9)
    x = dict(logps=logps(g, B), other_logps=logps(g, B), ref_logps=logps(g, B), ref_other_logps=logps(g, B),
             pref_probs=torch.rand(B, generator=g, dtype=torch.float64),
             other_pref_probs=torch.rand(B, generator=g, dtype=torch.float64))

    def ref(beta=0.1, **kw):
        h = kw["logps"] - kw["ref_logps"] - (kw["other_logps"] - kw["ref_other_logps"])
        return (h - (kw["pref_probs"] - kw["other_pref_probs"]) / beta) ** 2

    check(L.online_ipo, ref, x, ("logps", "other_logps"))
    assert L.get("egpo") is L.online_ipo


def test_rpo_sft_combine():
    g = gen(10)
    x = pair(10)
    n = lengths(g, B)
    nll = -x["chosen_logps"] / n

    def ref(beta=0.1, rpo_alpha=1.0, chosen_nll=None, **kw):
        hw, hl = hs(kw)
        return -logsig(beta * (hw - hl)) + rpo_alpha * chosen_nll

    check(L.rpo, ref, {**x, "chosen_nll": nll}, P, hp=dict(rpo_alpha=0.5))
    # sft: TRL token-mean over the batch, broadcast; per-sequence variant
    s = L.sft(chosen_logps=x["chosen_logps"], chosen_lengths=n)
    torch.testing.assert_close(s, torch.full((B,), float(-x["chosen_logps"].sum() / n.sum()), dtype=torch.float64))
    torch.testing.assert_close(L.sft(chosen_logps=x["chosen_logps"], chosen_lengths=n, per_sequence=True), nll)
    # combine = TRL loss_type=[sigmoid, sft] with loss_weights
    dpo = L.sigmoid(**x)
    torch.testing.assert_close(L.combine({"sigmoid": dpo, "sft": s}, {"sft": 0.3}), dpo + 0.3 * s)
    with pytest.raises(ValueError, match="unknown terms"):
        L.combine({"sigmoid": dpo}, {"sft": 1.0})


def test_regularisers():
    g = gen(11)
    lp = logps(g, B)
    check(L.xpo, lambda alpha=1e-5, ref_sample_logps=None: alpha * ref_sample_logps, {"ref_sample_logps": lp},
          ("ref_sample_logps",))
    for opt, sign in ((True, 1.0), (False, -1.0)):
        check(L.vpo, lambda logps=None, alpha=None, beta=0.1, optimistic=True: sign * alpha * beta * logps,
              {"logps": lp}, ("logps",), hp=dict(alpha=0.5, optimistic=opt))
    x = {**pair(12), "rationale_logps": logps(g, B)}

    def ref(beta=0.1, gamma=0.1, rationale_logps=None, **kw):
        hw, hl = hs(kw)
        return -logsig(beta * (hw - hl)) - logsig(gamma * rationale_logps)

    check(L.rdpo_rationale, ref, x, P + ("rationale_logps",), hp=dict(gamma=0.05))
