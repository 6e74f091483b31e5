"""fastpref.nn.PreferenceLoss equals the naive path (full logits → log_softmax → gather → sums → loss)."""
from __future__ import annotations

import inspect

import pytest
import torch

import fastpref.losses as L
from fastpref.nn import PreferenceLoss, unpack

S, T, D, V = 6, 9, 24, 97


def naive_tokens(h, w, labels, softcap=None):
    z = h.double() @ w.double().T
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lp = torch.log_softmax(z, -1)
    safe = labels.clamp(min=0)
    return torch.where(labels >= 0, lp.gather(-1, safe[..., None]).squeeze(-1), torch.zeros_like(lp[..., 0])), lp


def make(seed=0, s=S):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(s, T, D, generator=g)
    w = torch.randn(V, D, generator=g) / D**0.5
    labels = torch.randint(0, V, (s, T), generator=g)
    labels[:, :3] = -100  # prompt
    labels[1, -2:] = -100  # padding
    rh = torch.randn(s, T, D, generator=g)
    rw = torch.randn(V, D, generator=g) / D**0.5
    return h, w, labels, rh, rw


def grads(loss, xs):
    return torch.autograd.grad(loss, xs)


def close(a, b, tol=2e-5):
    torch.testing.assert_close(a.double(), b.double(), atol=tol * (1 + b.abs().max().item()), rtol=tol)


@pytest.mark.parametrize("spec, hp", [("sigmoid", dict(beta=0.2, label_smoothing=0.1)), ("ipo", {}),
                                      ({"sigmoid": 1.0, "sft": 0.5}, {}), ("robust", dict(label_smoothing=0.1)),
                                      ("simpo", {})])
def test_pairs_padded_with_precomputed_reference(spec, hp):
    h, w, labels, rh, rw = make(1)
    ref_logps = naive_tokens(rh, rw, labels)[0].sum(-1).float()
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = PreferenceLoss(spec, backend="torch", **hp)(hh, ww, labels, ref_logps=ref_logps)
    ours = grads(out.loss, [hh, ww])
    # naive
    hg, wg = h.double().requires_grad_(), w.double().requires_grad_()
    tok = naive_tokens(hg, wg, labels)[0]
    sums, n = tok.sum(-1), (labels >= 0).sum(-1)
    B = S // 2
    ctx = dict(chosen_logps=sums[:B], rejected_logps=sums[B:], ref_chosen_logps=ref_logps[:B].double(),
               ref_rejected_logps=ref_logps[B:].double(), chosen_lengths=n[:B], rejected_lengths=n[B:])
    terms = {}
    for name, weight in ({spec: 1.0} if isinstance(spec, str) else spec).items():
        if name == "sft":
            terms[name] = weight * (-sums[:B].sum() / n[:B].sum()).expand(B)
        else:
            fn = L.get(name)
            import inspect
            params = inspect.signature(fn).parameters
            terms[name] = weight * fn(**{k: v for k, v in ctx.items() if k in params}, **hp).double()
    gold = sum(terms.values()).mean()
    close(out.loss, gold)
    for a, b in zip(ours, grads(gold, [hg, wg])):
        close(a, b)
    assert set(out.metrics) >= {"rewards/chosen", "rewards/accuracies", "rewards/margins", "logps/ranking_accuracy"}


def test_pairs_packed_equals_padded():
    h, w, labels, rh, rw = make(2)
    lengths = (labels >= 0).sum(-1)  # keep only non-ignored tail? pack the full rows, ignore via labels
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), torch.full((S,), T).cumsum(0)])
    loss = PreferenceLoss("sigmoid", backend="torch")
    hh = h.clone().requires_grad_()
    padded = loss(hh, w, labels, ref_hidden=rh, ref_weight=rw)
    g1 = grads(padded.loss, [hh])[0]
    hp = h.clone().requires_grad_()
    packed = loss(hp.reshape(1, S * T, D), w, labels.reshape(1, -1), cu_seqlens=cu,
                  ref_hidden=rh.reshape(1, S * T, D), ref_weight=rw)
    g2 = grads(packed.loss, [hp])[0]
    close(packed.loss, padded.loss, 1e-6)
    close(g2, g1, 1e-6)
    assert lengths.min() > 0


def test_packed_variable_lengths():
    h, w, labels, rh, rw = make(3)
    lens = torch.tensor([5, 9, 7, 4, 8, 6])
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])
    flat_h = torch.cat([h[i, :n] for i, n in enumerate(lens)])
    flat_y = torch.cat([labels[i, :n] for i, n in enumerate(lens)])
    flat_y[cu[:-1]] = -100
    hh = flat_h.clone().requires_grad_()
    out = PreferenceLoss("sigmoid", backend="torch")(hh, w, flat_y, cu_seqlens=cu, ref_logps=torch.zeros(S))
    hg = flat_h.double().requires_grad_()
    tok = naive_tokens(hg, w, flat_y)[0]
    sums = torch.stack([tok[cu[i]:cu[i + 1]].sum() for i in range(S)])
    gold = L.get("sigmoid")(chosen_logps=sums[:3], rejected_logps=sums[3:], ref_chosen_logps=torch.zeros(3),
                            ref_rejected_logps=torch.zeros(3)).double().mean()
    close(out.loss, gold)
    close(grads(out.loss, [hh])[0], grads(gold, [hg])[0])


def test_unpack_roundtrip():
    x = torch.arange(10.0)
    cu = torch.tensor([0, 3, 3, 10])
    p = unpack(x, cu, fill=-1)
    assert p.shape == (3, 7) and p[0, :3].tolist() == [0, 1, 2] and (p[1] == -1).all() and p[2].tolist() == list(range(3, 10))
    with pytest.raises(ValueError, match="cu_seqlens"):
        unpack(x, torch.tensor([0, 5, 3]))


def test_listwise_plackett_luce():
    K = 3
    h, w, labels, rh, rw = make(4)
    scores = torch.randn(S // K, K)
    hh = h.clone().requires_grad_()
    out = PreferenceLoss("plackett_luce", layout="list", num_responses=K, backend="torch")(
        hh, w, labels, ref_hidden=rh, ref_weight=rw, scores=scores)
    hg = h.double().requires_grad_()
    lp = naive_tokens(hg, w, labels)[0].sum(-1).reshape(-1, K)
    ref = naive_tokens(rh, rw, labels)[0].sum(-1).reshape(-1, K)
    gold = L.get("plackett_luce")(logps=lp, ref_logps=ref, scores=scores).double().mean()
    close(out.loss, gold)
    close(grads(out.loss, [hh])[0], grads(gold, [hg])[0])


def test_unpaired_kto():
    h, w, labels, rh, rw = make(5)
    desirable = torch.tensor([True, False, True, True, False, False])
    hh = h.clone().requires_grad_()
    out = PreferenceLoss("kto", layout="unpaired", backend="torch")(
        hh, w, labels, ref_hidden=rh, ref_weight=rw, desirable=desirable, kl=torch.tensor(0.3))
    hg = h.double().requires_grad_()
    lp = naive_tokens(hg, w, labels)[0].sum(-1)
    ref = naive_tokens(rh, rw, labels)[0].sum(-1)
    gold = L.get("kto")(logps=lp, ref_logps=ref, desirable=desirable, kl=torch.tensor(0.3)).double().mean()
    close(out.loss, gold)
    close(grads(out.loss, [hh])[0], grads(gold, [hg])[0])
    assert "rewards/chosen" in out.metrics and "rewards/rejected" in out.metrics


@pytest.mark.parametrize("name", ["tdpo1", "tdpo2"])
def test_token_level_tdpo_uses_full_kl(name):
    h, w, labels, rh, rw = make(6)
    hh = h.clone().requires_grad_()
    out = PreferenceLoss(name, backend="torch")(hh, w, labels, ref_hidden=rh, ref_weight=rw)
    hg = h.double().requires_grad_()
    tok, lp_all = naive_tokens(hg, w, labels)
    ref_tok, lq_all = naive_tokens(rh, rw, labels)
    kl = (lq_all.exp() * (lq_all - lp_all)).sum(-1)
    mask = labels >= 0
    B = S // 2
    gold = L.get(name)(chosen_token_logps=tok[:B], rejected_token_logps=tok[B:], ref_chosen_token_logps=ref_tok[:B],
                       ref_rejected_token_logps=ref_tok[B:], chosen_token_kl=kl[:B], rejected_token_kl=kl[B:],
                       chosen_mask=mask[:B], rejected_mask=mask[B:]).double().mean()
    close(out.loss, gold)
    close(grads(out.loss, [hh])[0], grads(gold, [hg])[0])
    assert out.metrics["kl/mean_token"] > 0


def test_wpo_weighting():
    h, w, labels, rh, rw = make(7)
    out = PreferenceLoss("sigmoid", use_weighting=True, backend="torch")(h, w, labels, ref_hidden=rh, ref_weight=rw)
    tok, lp_all = naive_tokens(h, w, labels)
    p2 = torch.logsumexp(2 * lp_all, -1)
    mask = labels >= 0
    wts = torch.exp(((tok - p2) * mask).sum(-1) / mask.sum(-1))
    sums = tok.sum(-1)
    ref = naive_tokens(rh, rw, labels)[0].sum(-1)
    B = S // 2
    per = L.get("sigmoid")(chosen_logps=sums[:B], rejected_logps=sums[B:], ref_chosen_logps=ref[:B],
                           ref_rejected_logps=ref[B:]).double()
    close(out.loss, (per * wts[:B] * wts[B:]).mean())


def test_errors():
    h, w, labels, rh, rw = make(8)
    with pytest.raises(ValueError, match="reference log-probs"):
        PreferenceLoss("sigmoid", backend="torch")(h, w, labels)
    with pytest.raises(ValueError, match="token KL"):
        PreferenceLoss("tdpo1", backend="torch")(h, w, labels, ref_logps=torch.zeros(S))
    with pytest.raises(ValueError, match="unknown loss"):
        PreferenceLoss("dpo_magic")
    with pytest.raises(ValueError, match="hyper-parameter"):
        PreferenceLoss("sigmoid", betta=0.1)
    with pytest.raises(ValueError, match="num_responses"):
        PreferenceLoss("plackett_luce", layout="list")
    with pytest.raises(ValueError, match="desirable"):
        PreferenceLoss("kto", layout="unpaired", backend="torch")(h, w, labels, ref_logps=torch.zeros(S), kl=0.0)
    with pytest.raises(ValueError, match="not taken"):
        PreferenceLoss("sigmoid", backend="torch")(h, w, labels, ref_logps=torch.zeros(S), scores=torch.zeros(3))
    with pytest.raises(ValueError, match="even"):
        PreferenceLoss("sigmoid", backend="torch")(h[:5], w, labels[:5], ref_logps=torch.zeros(5))


# Loss inputs that share a name with a PreferenceLoss argument must mean the same thing: the module hands the
# loss what it computed from that argument (reference sums / token log-probs, the unpaired desirable flags).
SAME_MEANING = {"ref_logps", "ref_token_logps", "desirable"}


@pytest.mark.parametrize("name", L.names())
def test_no_loss_input_shadows_a_module_argument(name):
    module_args = (set(inspect.signature(PreferenceLoss.forward).parameters) |
                   set(inspect.signature(PreferenceLoss.__init__).parameters)) - {"self", "loss_inputs", "hparams"}
    clash = (set(inspect.signature(L.get(name)).parameters) & module_args) - SAME_MEANING
    assert not clash, f"loss {name!r} takes {sorted(clash)}, also an argument of PreferenceLoss"


@pytest.mark.parametrize("name, nll_tokens", [("orpo", None), ("orpo", "completion"), ("cpo", None),
                                              ("rpo", "sequence"), ("asft", None)])
@pytest.mark.parametrize("packed", [False, True])
def test_chosen_nll_token_set(name, nll_tokens, packed):
    """ORPO's NLL counts the prompt (TRL's ORPOTrainer), the others only the completion; either can be forced.
    Every other quantity still counts only the completion."""
    h, w, labels, rh, rw = make(8)
    g = torch.Generator().manual_seed(9)
    nll_labels = torch.where(labels >= 0, labels, torch.randint(0, V, labels.shape, generator=g))
    nll_labels[1, -2:] = -100  # padding stays out
    ref_logps = naive_tokens(rh, rw, labels)[0].sum(-1).float()
    hh = h.clone().requires_grad_()
    loss = PreferenceLoss(name, backend="torch", nll_tokens=nll_tokens)
    args = dict(ref_logps=ref_logps, nll_labels=nll_labels)
    if packed:
        cu = torch.arange(0, S * T + 1, T, dtype=torch.int32)
        out = loss(hh.reshape(1, S * T, D), w, labels.reshape(1, -1), cu_seqlens=cu, ref_logps=ref_logps,
                   nll_labels=nll_labels.reshape(1, -1))
    else:
        out = loss(hh, w, labels, **args)
    hg = h.double().requires_grad_()
    tok = naive_tokens(hg, w.double(), labels)[0]
    seq = (nll_tokens or ("sequence" if name == "orpo" else "completion")) == "sequence"
    nll_tok = naive_tokens(hg, w.double(), nll_labels if seq else labels)[0]
    B = S // 2
    nll_mask = (nll_labels if seq else labels)[:B] >= 0
    chosen_nll = -(nll_tok[:B].sum() / nll_mask.sum())
    n = (labels >= 0).sum(-1)
    ctx = dict(chosen_logps=tok.sum(-1)[:B], rejected_logps=tok.sum(-1)[B:], ref_chosen_logps=ref_logps[:B].double(),
               ref_rejected_logps=ref_logps[B:].double(), chosen_lengths=n[:B], rejected_lengths=n[B:],
               chosen_nll=chosen_nll.expand(B))
    fn = L.get(name)
    gold = fn(**{k: v for k, v in ctx.items() if k in inspect.signature(fn).parameters}).mean()
    close(out.loss, gold)
    close(torch.autograd.grad(out.loss, hh)[0], torch.autograd.grad(gold, hg)[0])


def test_sequence_nll_needs_nll_labels():
    h, w, labels, rh, rw = make(10)
    with pytest.raises(ValueError, match="nll_labels"):
        PreferenceLoss("orpo", backend="torch")(h, w, labels)
    with pytest.raises(ValueError, match="nll_tokens"):
        PreferenceLoss("orpo", nll_tokens="prompt")
