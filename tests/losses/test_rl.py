"""On-policy RL losses (grpo / ppo_clip, gspo, cispo) against naive float64 formulas, value and gradient.

The gold loops over sequences and tokens in python and never calls fastpref.losses.
"""
import math

import pytest
import torch

from _ref import gen

import fastpref.losses as L

B, T = 5, 8
D64 = torch.float64


def batch(seed: int, per_token_adv: bool = False, spread: float = 0.3) -> dict:
    g = gen(seed)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for i in range(B):
        n = int(torch.randint(1, T + 1, (1,), generator=g))
        mask[i, :n] = True
    mask[-1] = False
    mask[-1, 2:5] = True  # a row starting after a prompt-like gap
    lp = -torch.rand(B, T, generator=g, dtype=D64) * 3
    old = lp + spread * torch.randn(B, T, generator=g, dtype=D64)
    sampler = old + 0.5 * torch.randn(B, T, generator=g, dtype=D64)
    ref = lp + 0.5 * torch.randn(B, T, generator=g, dtype=D64)
    adv = torch.randn((B, T) if per_token_adv else (B,), generator=g, dtype=D64)
    ent = torch.rand(B, T, generator=g, dtype=D64) * 2
    tkl = torch.rand(B, T, generator=g, dtype=D64)
    for x in (lp, old, sampler, ref, ent, tkl):  # padding holds garbage the losses must ignore
        x.masked_fill_(~mask, float("nan"))
    lp.masked_fill_(~mask, -float("inf"))
    return dict(token_logps=lp, old_token_logps=old, sampler=sampler, ref_token_logps=ref, advantages=adv,
                entropies=ent, token_kl=tkl, mask=mask)


def gold(b: dict, kind: str, *, epsilon=0.2, epsilon_high=None, delta=None, beta=0.0, kl="k3", bias_kl=True,
         entropy_coef=0.0, loss_type="dapo", L_max=None, n_items=None, is_ratio=None, on_policy=False):
    """Naive: python loops, math.exp, the papers' formulas."""
    lp, old, ref, A, H, TKL, m = (b[k] for k in ("token_logps", "old_token_logps", "ref_token_logps", "advantages",
                                                 "entropies", "token_kl", "mask"))
    eh = epsilon if epsilon_high is None else epsilon_high
    rows = []
    for i in range(B):
        toks = [t for t in range(T) if m[i, t]]
        a = lambda t: A[i, t] if A.dim() == 2 else A[i]  # noqa: E731
        o = lambda t: lp[i, t].detach() if on_policy else old[i, t]  # noqa: E731
        seq_ratio = torch.exp(sum(lp[i, t] - o(t) for t in toks) / max(len(toks), 1)) if toks else None
        terms = []
        for t in toks:
            r = seq_ratio if kind == "gspo" else torch.exp(lp[i, t] - o(t))
            if kind == "gspo" and A.dim() == 2:  # GSPO-token: value s_i, gradient through token t only
                r_pg = seq_ratio.detach() * torch.exp(lp[i, t] - lp[i, t].detach())
            else:
                r_pg = r
            if kind == "cispo":
                w = min(float(r.detach()), eh)
                psi = -w * a(t) * lp[i, t]
            else:
                rr = torch.clamp(r_pg, max=delta) if delta is not None else r_pg
                psi = -torch.min(rr * a(t), min(max(r_pg, 1 - epsilon), 1 + eh) * a(t))
            if is_ratio is not None:
                psi = psi * float(is_ratio[i, t] if is_ratio.shape[1] > 1 else is_ratio[i, 0])
            if beta:
                if kl == "exact":
                    k = TKL[i, t]
                else:
                    rho = lp[i, t] - ref[i, t]
                    k = {"k1": rho, "k2": rho ** 2 / 2, "k3": torch.exp(-rho) + rho - 1}[kl]
                    if bias_kl:
                        k = k * r
                psi = psi + beta * k
            terms.append(psi)
        rows.append((sum(terms) if terms else torch.zeros((), dtype=D64), len(toks)))
    n_tok = sum(n for _, n in rows)
    if loss_type == "grpo":
        loss = sum(s / max(n, 1) for s, n in rows) / B
    elif loss_type == "bnpo":
        loss = sum(s for s, _ in rows) / n_tok
    elif loss_type == "dr_grpo":
        loss = sum(s for s, _ in rows) / (B * (L_max or T))
    else:
        loss = sum(s for s, _ in rows) / (n_items or n_tok)
    if entropy_coef:
        loss = loss - entropy_coef * sum(H[i, t] for i in range(B) for t in range(T) if m[i, t]) / n_tok
    return loss


NAME = {"grpo": "grpo", "gspo": "gspo", "cispo": "cispo"}
CASES = [
    ("grpo", dict()), ("grpo", dict(loss_type="grpo")), ("grpo", dict(loss_type="bnpo")),
    ("grpo", dict(loss_type="dr_grpo", max_completion_length=11)), ("grpo", dict(loss_type="dapo", num_items=37)),
    ("grpo", dict(epsilon_high=0.28)), ("grpo", dict(delta=1.1, epsilon=0.05)),
    ("grpo", dict(beta=0.04)), ("grpo", dict(beta=0.04, use_bias_correction_kl=False, kl_estimator="k1")),
    ("grpo", dict(beta=0.1, kl_estimator="k2", loss_type="bnpo")), ("grpo", dict(beta=0.1, exact_kl=True)),
    ("grpo", dict(entropy_coef=0.01, loss_type="grpo")), ("grpo", dict(is_mode="token_truncate")),
    ("grpo", dict(is_mode="sequence_mask", beta=0.04)), ("grpo", dict(on_policy=True, beta=0.04)),
    ("gspo", dict()), ("gspo", dict(epsilon=0.05, epsilon_high=0.1, beta=0.04)), ("gspo", dict(loss_type="bnpo")),
    ("cispo", dict()), ("cispo", dict(epsilon_high=1.1, beta=0.04, entropy_coef=0.02)),
    ("cispo", dict(epsilon_high=1.05, loss_type="grpo", is_mode="token_mask")),
]


def run_ours(b, kind, cfg):
    cfg = dict(cfg)
    on_policy, exact, is_mode = cfg.pop("on_policy", False), cfg.pop("exact_kl", False), cfg.pop("is_mode", None)
    n_items = cfg.pop("num_items", None)
    kw = dict(token_logps=b["token_logps"], advantages=b["advantages"], mask=b["mask"],
              ref_token_logps=b["ref_token_logps"], entropies=b["entropies"])
    if not on_policy:
        kw["old_token_logps"] = b["old_token_logps"]
    if exact:
        kw["token_kl"] = b["token_kl"]
    if is_mode:
        old = b["token_logps"].detach() if on_policy else b["old_token_logps"]
        kw["importance_sampling_ratio"] = L.sampler_importance_ratio(old, b["sampler"], b["mask"], is_mode,
                                                                     clip_min=0.5, clip_max=1.5)
    if n_items is not None:
        kw["num_items_in_batch"] = torch.tensor(n_items)
    return L.get(NAME[kind])(**kw, **cfg), kw.get("importance_sampling_ratio")


def run_gold(b, kind, cfg, is_ratio):
    cfg = dict(cfg)
    defaults = dict(gspo=dict(epsilon=3e-4, epsilon_high=4e-4, loss_type="grpo"), cispo=dict(epsilon_high=5.0),
                    grpo=dict())[kind]
    cfg = {**defaults, **cfg}
    ren = dict(use_bias_correction_kl="bias_kl", kl_estimator="kl", max_completion_length="L_max",
               num_items="n_items")
    out = {ren.get(k, k): v for k, v in cfg.items() if k != "is_mode"}
    if out.pop("exact_kl", False):
        out["kl"] = "exact"
    return gold(b, kind, is_ratio=is_ratio, **out)


@pytest.mark.parametrize("kind,cfg", CASES)
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_rl_loss_value_and_gradients_match_formula(kind, cfg, per_token_adv):
    b = batch(len(cfg) + 3 * per_token_adv, per_token_adv)
    b = {k: v.clone().requires_grad_() if k in ("token_logps", "entropies", "token_kl") else v for k, v in b.items()}
    ours, is_ratio = run_ours(b, kind, cfg)
    assert ours.shape == (B,) and ours.dtype == D64
    ref = run_gold(b, kind, cfg, is_ratio)
    torch.testing.assert_close(ours.mean(), ref, rtol=1e-10, atol=1e-12)
    leaves = [b["token_logps"], b["entropies"], b["token_kl"]]
    g_ours = torch.autograd.grad(ours.mean(), leaves, allow_unused=True, materialize_grads=True)
    g_gold = torch.autograd.grad(ref, leaves, allow_unused=True, materialize_grads=True)
    for go, gg in zip(g_ours, g_gold):
        assert torch.isfinite(go).all()
        torch.testing.assert_close(go, gg.nan_to_num(0.0), rtol=1e-10, atol=1e-12)


def test_random_upstream_gradient_weights_each_sequence():
    b = batch(7)
    lp = b["token_logps"].clone().requires_grad_()
    out = L.grpo(token_logps=lp, old_token_logps=b["old_token_logps"], advantages=b["advantages"], mask=b["mask"],
                 loss_type="grpo", beta=0.04, ref_token_logps=b["ref_token_logps"])
    up = torch.randn(B, generator=gen(1), dtype=D64)
    (g,) = torch.autograd.grad(out, lp, up)
    for i in range(B):  # sequence i's share only depends on row i under "grpo"
        row = L.grpo(token_logps=lp[i:i + 1], old_token_logps=b["old_token_logps"][i:i + 1],
                     advantages=b["advantages"][i:i + 1], mask=b["mask"][i:i + 1], loss_type="grpo", beta=0.04,
                     ref_token_logps=b["ref_token_logps"][i:i + 1])
        (gi,) = torch.autograd.grad(row.sum() * up[i], lp)
        torch.testing.assert_close(g[i], gi[i], rtol=1e-10, atol=1e-12)


def test_fp32_is_as_close_to_gold_as_plain_torch():
    b = batch(3, spread=2.0)
    ref = gold(b, "grpo", beta=0.04, loss_type="bnpo")
    b32 = {k: v.float() if v.is_floating_point() else v for k, v in b.items()}
    ours = L.grpo(token_logps=b32["token_logps"], old_token_logps=b32["old_token_logps"], mask=b["mask"],
                  advantages=b32["advantages"], ref_token_logps=b32["ref_token_logps"], beta=0.04,
                  loss_type="bnpo").mean()
    naive32 = gold(b32, "grpo", beta=0.04, loss_type="bnpo")
    assert abs(float(ours) - float(ref)) <= abs(float(naive32) - float(ref)) + 1e-6


def test_sampler_ratio_modes():
    b = batch(2)
    old, smp, m = b["old_token_logps"], b["sampler"], b["mask"]
    r = L.sampler_importance_ratio(old, smp, m, "token_truncate", clip_max=2.0)
    for i in range(B):
        for t in range(T):
            want = min(math.exp(float(old[i, t] - smp[i, t])), 2.0) if m[i, t] else 1.0
            assert abs(float(r[i, t]) - want) < 1e-12
    rs = L.sampler_importance_ratio(old, smp, m, "sequence_mask", clip_min=0.5, clip_max=2.0)
    for i in range(B):
        s = math.exp(sum(float(old[i, t] - smp[i, t]) for t in range(T) if m[i, t]))
        assert float(rs[i, 0]) == pytest.approx(s if 0.5 <= s <= 2.0 else 0.0, rel=1e-12)
    nan_smp = smp.clone()
    nan_smp[0, 0] = float("nan")
    assert float(L.sampler_importance_ratio(old, nan_smp, m)[0, 0]) == 1.0
    with pytest.raises(ValueError, match="importance sampling mode"):
        L.sampler_importance_ratio(old, smp, m, "token_clip")


def test_extreme_ratios_stay_finite():
    b = batch(4)
    for shift in (1e4, -1e4):
        lp = b["token_logps"].clone().requires_grad_()
        for name in ("grpo", "gspo", "cispo"):
            out = L.get(name)(token_logps=lp, old_token_logps=b["old_token_logps"] - shift, mask=b["mask"],
                              advantages=b["advantages"], ref_token_logps=b["ref_token_logps"] + shift, beta=0.04)
            (g,) = torch.autograd.grad(out.mean(), lp)
            assert torch.isfinite(out).all() and torch.isfinite(g).all(), name


@pytest.mark.parametrize("kw,match", [
    (dict(loss_type="mean"), "loss_type"), (dict(kl_estimator="k4", beta=0.1), "kl_estimator"),
    (dict(entropy_coef=0.1), "entropies"), (dict(beta=0.1), "ref_token_logps"),
    (dict(advantages=torch.zeros(B + 1)), "advantages"),
])
def test_user_errors_name_the_argument(kw, match):
    b = batch(0)
    base = dict(token_logps=b["token_logps"], advantages=b["advantages"], mask=b["mask"])
    with pytest.raises(ValueError, match=match):
        L.grpo(**{**base, **kw})
    with pytest.raises(ValueError, match="importance_sampling_level"):
        L.log_ratio(b["token_logps"], None, b["mask"], level="seq")


@pytest.mark.parametrize("name", ["grpo", "gspo", "cispo"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_no_mask_equals_all_ones_mask(name, loss_type):
    b = batch(5)
    full = torch.ones(B, T, dtype=torch.bool)
    kw = dict(token_logps=b["token_logps"].nan_to_num(-1.0, neginf=-1.0), advantages=b["advantages"],
              old_token_logps=b["old_token_logps"].nan_to_num(-1.0), loss_type=loss_type, max_completion_length=13,
              num_items_in_batch=57)
    torch.testing.assert_close(L.get(name)(**kw), L.get(name)(**kw, mask=full))


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("corrected", [True, False])
def test_sampled_kl_penalty_gradient_is_what_kl_gradients_says(estimator, corrected):
    """The exact expected gradient of β·KL on tokens drawn from π_old = π_θ (a 6-token vocabulary: the sum over
    every token weighted by sg(π_θ)), against autograd of the reverse KL(π_θ‖π_ref), the forward KL(π_ref‖π_θ)
    and zero; k2 with the ratio factor matches none (its gradient is E[(ρ + ρ²/2)·∇log π])."""
    g = gen(11)
    theta = torch.randn(6, generator=g, dtype=D64, requires_grad=True)
    ref = torch.log_softmax(torch.randn(6, generator=g, dtype=D64), -1)
    lp = torch.log_softmax(theta, -1)
    per_token = L.get("grpo")(token_logps=lp[:, None], advantages=torch.zeros(6, dtype=D64),
                              ref_token_logps=ref[:, None], beta=1.0, kl_estimator=estimator,
                              use_bias_correction_kl=corrected, loss_type="grpo")  # [6]: each token a sequence
    (expected,) = torch.autograd.grad((lp.exp().detach() * per_token).sum(), theta)
    grad = lambda f: torch.autograd.grad(f(torch.log_softmax(theta, -1)), theta)[0]  # noqa: E731
    golds = {"reverse": grad(lambda l: (l.exp() * (l - ref)).sum()),
             "forward": grad(lambda l: (ref.exp() * (ref - l)).sum()), "zero": torch.zeros(6, dtype=D64)}
    rho = (lp - ref).detach()
    golds["biased"] = grad(lambda l: (lp.exp().detach() * (rho + rho ** 2 / 2) * l).sum())
    want = L.rl.KL_GRADIENTS[(estimator, corrected)]
    for name, grad in golds.items():
        assert torch.allclose(expected, grad, atol=1e-12) == (name == want), (name, want)
