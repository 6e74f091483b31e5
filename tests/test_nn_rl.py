"""fastpref.nn.PolicyLoss equals the naive path (full float64 logits → log_softmax → gather / entropy / KL)."""
from __future__ import annotations

import pytest
import torch

import fastpref.losses as L
from fastpref.nn import PolicyLoss

S, T, D, V = 5, 9, 16, 67


def make(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(S, T, D, generator=g)
    w = torch.randn(V, D, generator=g) / D**0.5 * 3
    labels = torch.randint(0, V, (S, T), generator=g)
    labels[:, :2] = -100  # prompt
    labels[1, -3:] = -100  # padding
    labels[3, 2:] = -100  # a one-token-less-than-nothing completion: no tokens at all
    rh = h + 0.3 * torch.randn(S, T, D, generator=g)
    rw = w + 0.1 * torch.randn(V, D, generator=g)
    adv = torch.randn(S, generator=g)
    noise = lambda: 0.3 * torch.randn(S, T, generator=g)  # noqa: E731
    return h, w, labels, rh, rw, adv, noise


def naive(h, w, labels):
    """Per-token log p(label), entropy and log-softmax from float64 logits."""
    lsm = torch.log_softmax(h.double() @ w.double().T, -1)
    tok = lsm.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    ent = -(lsm.exp() * lsm).sum(-1)
    m = labels >= 0
    return torch.where(m, tok, 0.0), torch.where(m, ent, 0.0), lsm


def close(a, b, tol=2e-5):
    torch.testing.assert_close(a.double(), b.double(), atol=tol * (1 + b.abs().max().item()), rtol=tol)


@pytest.mark.parametrize("loss,hp,kl", [
    ("grpo", dict(loss_type="grpo", beta=0.04, entropy_coef=0.01), "k3"),
    ("ppo_clip", dict(loss_type="bnpo", beta=0.1, epsilon_high=0.28), "k1"),
    ("grpo", dict(loss_type="dapo", beta=0.1, delta=1.2), "exact"),
    ("gspo", dict(epsilon=0.05, beta=0.02), "k3"),
    ("cispo", dict(epsilon_high=1.2, entropy_coef=0.02), "k3"),
])
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_policy_loss_matches_naive(loss, hp, kl, backend):
    h, w, labels, rh, rw, adv, noise = make(1)
    tok0, _, _ = naive(h, w, labels)
    old = (tok0 + noise()).float()
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = PolicyLoss(loss, kl=kl, backend=backend, **hp)(hh, ww, labels, advantages=adv, old_token_logps=old,
                                                         ref_hidden=rh, ref_weight=rw)
    ours = torch.autograd.grad(out.loss, [hh, ww])
    hg, wg = h.double().requires_grad_(), w.double().requires_grad_()
    tok, ent, lsm = naive(hg, wg, labels)
    rtok, _, rlsm = naive(rh, rw, labels)
    exact = (lsm.exp() * (lsm - rlsm)).sum(-1)
    kw = dict(token_logps=tok, advantages=adv.double(), old_token_logps=old.double(), mask=labels >= 0,
              entropies=ent, **hp)
    if kl == "exact":
        kw["token_kl"] = exact
    else:
        kw.update(ref_token_logps=rtok, kl_estimator=kl)
    gold = L.get(loss)(**kw)
    close(out.losses, gold)
    for a, b in zip(ours, torch.autograd.grad(gold.mean(), [hg, wg])):
        close(a, b)
    assert out.metrics["entropy"] == pytest.approx(float(ent.detach()[labels >= 0].mean()), rel=1e-4)
    if kl == "exact":
        assert out.metrics["kl"] == pytest.approx(float(exact.detach()[labels >= 0].mean()), rel=1e-4)
        assert (exact[labels >= 0] >= -1e-12).all()


def test_packed_equals_padded_with_sampler_ratio_and_token_advantages():
    h, w, labels, rh, rw, _, noise = make(2)
    tok0 = naive(h, w, labels)[0].float()
    old, sampler, ref = tok0 + noise(), tok0 + noise(), tok0 + noise()
    adv = torch.randn(S, T, generator=torch.Generator().manual_seed(3))
    mod = PolicyLoss("grpo", backend="torch", loss_type="bnpo", beta=0.04, importance_sampling_mode="token_truncate",
                     importance_sampling_clip_max=1.5)
    hh = h.clone().requires_grad_()
    pad = mod(hh, w, labels, advantages=adv, old_token_logps=old, sampler_token_logps=sampler, ref_token_logps=ref)
    (g_pad,) = torch.autograd.grad(pad.loss, hh)
    lengths = torch.tensor([9, 6, 9, 3, 9])  # per-row lengths; rows are cut at their length when packed
    keep = torch.arange(T)[None, :] < lengths[:, None]
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    hp = h.clone().requires_grad_()
    packed = mod(hp[keep], w, labels[keep], advantages=adv[keep], old_token_logps=old[keep],
                 sampler_token_logps=sampler[keep], ref_token_logps=ref[keep], cu_seqlens=cu)
    (g_packed,) = torch.autograd.grad(packed.loss, hp)
    labels_cut = labels.masked_fill(~keep, -100)
    assert torch.equal(labels_cut, labels)  # the cut positions are all padding/prompt already
    close(packed.losses, pad.losses, 1e-6)
    close(g_packed, g_pad, 1e-6)
    assert packed.metrics == pytest.approx(pad.metrics)
    # the sampler ratio enters: without it the loss differs
    plain = mod(h, w, labels, advantages=adv, old_token_logps=old, ref_token_logps=ref)
    assert not torch.allclose(plain.losses, pad.losses)


def test_policy_loss_errors():
    h, w, labels, rh, rw, adv, _ = make(0)
    with pytest.raises(ValueError, match="not a policy-gradient loss"):
        PolicyLoss("sigmoid")
    with pytest.raises(ValueError, match="kl must be one of"):
        PolicyLoss("grpo", kl="k5")
    with pytest.raises(ValueError, match=r"\['beta_kl'\]"):
        PolicyLoss("grpo", beta_kl=0.1)
    with pytest.raises(ValueError, match="ref_hidden"):
        PolicyLoss("grpo", kl="exact", beta=0.1, backend="torch")(h, w, labels, advantages=adv)
    with pytest.raises(ValueError, match="ref_token_logps"):
        PolicyLoss("grpo", beta=0.1, backend="torch")(h, w, labels, advantages=adv)
    with pytest.raises(ValueError, match="advantages"):
        PolicyLoss("grpo", backend="torch")(h, w, labels, advantages=adv[:-1])
    with pytest.raises(ValueError, match="old_token_logps must be shaped like labels"):
        PolicyLoss("grpo", backend="torch")(h, w, labels, advantages=adv, old_token_logps=adv)
