"""Cross-check against TRL's own trainer code (opt-in: importing TRL takes ~20 s).

Run with FASTPREF_TEST_TRL=1 and `trl` installed. DPOTrainer._compute_loss is called on a stub trainer and a
stub model that returns chosen per-token log-probs (TRL >= 1.16 fused-LM-head interface); value *and* gradient
w.r.t. the per-token log-probs are compared. ORPO / CPO loss methods are called on stub trainers.
"""
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from _ref import gen

import fastpref.losses as L

if os.environ.get("FASTPREF_TEST_TRL") != "1":
    pytest.skip("set FASTPREF_TEST_TRL=1 to cross-check against TRL", allow_module_level=True)
dpo_mod = pytest.importorskip("trl.trainer.dpo_trainer")

B, T = 5, 9
ACC = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)


def batch(seed):
    g = gen(seed)
    mask = torch.zeros(2 * B, T + 1, dtype=torch.int64)
    for i in range(2 * B):
        start, n = int(torch.randint(1, 3, (1,), generator=g)), int(torch.randint(1, T - 2, (1,), generator=g))
        mask[i, start:start + n] = 1
    tok = -torch.rand(2 * B, T, generator=g, dtype=torch.float64) * torch.rand(2 * B, 1, generator=g, dtype=torch.float64) * 2
    tok = tok * mask[:, 1:]
    ref = -torch.rand(2 * B, generator=g, dtype=torch.float64) * 8 + tok.sum(1)
    return mask, tok, ref


def trl_dpo(mask, tok, ref, loss_types, loss_weights=None, **cfg):
    tok = tok.clone().requires_grad_()
    out = SimpleNamespace(log_probs=tok, entropy=torch.zeros_like(tok), mean_logits=torch.zeros_like(tok),
                          is_top1=torch.zeros_like(tok, dtype=torch.bool))
    model = lambda **kw: out  # noqa: E731
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=ACC, aux_loss_enabled=False, precompute_ref_logps=True,
        ld_alpha=cfg.get("ld_alpha"), f_divergence_type=cfg.get("f_divergence_type", "reverse_kl"),
        f_alpha_divergence_coef=cfg.get("f_alpha_divergence_coef", 0.5), beta=cfg.get("beta", 0.1),
        label_smoothing=cfg.get("label_smoothing", 0.0), use_weighting=False, loss_types=loss_types,
        loss_weights=loss_weights or [1.0] * len(loss_types), args=SimpleNamespace(discopop_tau=cfg.get("discopop_tau", 0.05)),
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    inputs = dict(input_ids=torch.zeros_like(mask), attention_mask=torch.ones_like(mask), completion_mask=mask,
                  ref_chosen_logps=ref[:B], ref_rejected_logps=ref[B:])
    loss = dpo_mod.DPOTrainer._compute_loss(stub, model, inputs, False)
    (grad,) = torch.autograd.grad(loss, tok)
    return loss, grad * mask[:, 1:]  # the real fused head gives no gradient at label -100; the stub does


def ours(mask, tok, ref, name, **hp):
    tok = tok.clone().requires_grad_()
    m = mask[:, 1:]
    sums, n = L.masked_sums(tok, m)
    kw = dict(chosen_logps=sums[:B], rejected_logps=sums[B:], ref_chosen_logps=ref[:B], ref_rejected_logps=ref[B:])
    if name in ("ipo", "sigmoid_norm"):
        kw.update(chosen_lengths=n[:B], rejected_lengths=n[B:])
    if name == "ld_dpo":
        s = L.ld_dpo_shared_lengths(m[:B], m[B:]).repeat(2)
        sh, tl = L.ld_dpo_partial_sums(tok, m, s)
        zero = torch.zeros(B, dtype=torch.float64)  # TRL's precomputed ref logps are used as given
        kw = dict(chosen_shared_logps=sh[:B], chosen_tail_logps=tl[:B], rejected_shared_logps=sh[B:],
                  rejected_tail_logps=tl[B:], ref_chosen_shared_logps=ref[:B], ref_chosen_tail_logps=zero,
                  ref_rejected_shared_logps=ref[B:], ref_rejected_tail_logps=zero)
    if name == "sft":
        kw = dict(chosen_logps=sums[:B], chosen_lengths=n[:B])
    loss = L.get(name)(**kw, **hp).mean()
    (grad,) = torch.autograd.grad(loss, tok)
    return loss, grad


FDIV = [dict(), dict(f_divergence_type="forward_kl"), dict(f_divergence_type="js_divergence"),
        dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3)]
CASES = [(n, f) for n in ("sigmoid", "hinge", "ipo", "discopop", "sigmoid_norm") for f in FDIV] + [
    ("nca_pair", dict()), ("bco_pair", dict()), ("sppo_hard", dict()), ("sppo_hard", dict(beta=0.5)),
    ("robust", dict(label_smoothing=0.1)), ("robust", dict(label_smoothing=0.2, f_divergence_type="js_divergence")),
    ("robust", dict(label_smoothing=0.1, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.7)),
    ("exo_pair", dict(label_smoothing=1e-3)), ("exo_pair", dict(label_smoothing=0.1, f_divergence_type="forward_kl")),
    ("aot", dict()), ("aot", dict(label_smoothing=0.1)), ("aot_unpaired", dict(label_smoothing=0.1)),
    ("apo_zero", dict()), ("apo_down", dict()), ("apo_down", dict(beta=0.4)),
    ("sigmoid", dict(beta=0.5)), ("discopop", dict(beta=0.3, discopop_tau=0.2)), ("sft", dict()),
]


@pytest.mark.parametrize("name,cfg", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_dpo_loss_types_match_trl(name, cfg, seed):
    mask, tok, ref = batch(seed)
    scale = 30.0 if seed else 1.0  # seed 1: large margins
    tok, ref = tok * scale, ref * scale
    tol = dict(rtol=1e-6, atol=1e-9)
    if cfg.get("f_divergence_type") == "alpha_divergence":  # TRL's alpha path has no float64 clamp entry
        tok, ref, tol = tok.float(), ref.float(), dict(rtol=2e-4, atol=1e-6)
    l_trl, g_trl = trl_dpo(mask, tok, ref, [name], **cfg)
    hp = {k: v for k, v in cfg.items() if name != "sft"}
    l_us, g_us = ours(mask, tok, ref, name, **hp)
    torch.testing.assert_close(l_us, l_trl.to(l_us.dtype), **tol)
    torch.testing.assert_close(g_us, g_trl, **tol)


def test_ld_dpo_and_multi_loss_match_trl():
    mask, tok, ref = batch(3)
    l_trl, g_trl = trl_dpo(mask, tok, ref, ["sigmoid"], ld_alpha=0.4)
    l_us, g_us = ours(mask, tok, ref, "ld_dpo", ld_alpha=0.4)
    torch.testing.assert_close(l_us, l_trl, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(g_us, g_trl, rtol=1e-6, atol=1e-9)
    l_trl, _ = trl_dpo(mask, tok, ref, ["sigmoid", "sft"], [1.0, 0.3])
    l_s, _ = ours(mask, tok, ref, "sigmoid")
    l_f, _ = ours(mask, tok, ref, "sft")
    torch.testing.assert_close(l_s + 0.3 * l_f, l_trl, rtol=1e-6, atol=1e-9)


def test_orpo_and_cpo_match_trl():
    orpo_mod = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    cpo_mod = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    g = gen(4)
    n = torch.randint(1, 30, (2, B), generator=g)
    avg = -torch.rand(2, B, generator=g, dtype=torch.float64) ** 3 * 3  # average log-probs, some near 0
    stub = SimpleNamespace(beta=0.2, accelerator=ACC)
    trl_losses = orpo_mod.ORPOTrainer.odds_ratio_loss(stub, avg[0], avg[1])[0]
    nll = torch.tensor(0.7, dtype=torch.float64)
    us = L.orpo(chosen_logps=avg[0] * n[0], rejected_logps=avg[1] * n[1], chosen_lengths=n[0], rejected_lengths=n[1],
                chosen_nll=nll, beta=0.2)
    torch.testing.assert_close(us.mean(), (nll - trl_losses.double().mean()), rtol=1e-5, atol=1e-6)  # TRL: fp32
    lw, ll = avg[0] * n[0], avg[1] * n[1]
    for cfg in (dict(loss_type="sigmoid", alpha=0.0, label_smoothing=0.0), dict(loss_type="sigmoid", alpha=0.0, label_smoothing=0.1),
                dict(loss_type="sigmoid", alpha=0.2, label_smoothing=0.0), dict(loss_type="simpo", alpha=0.0, label_smoothing=0.1)):
        stub = SimpleNamespace(beta=0.1 if cfg["loss_type"] == "sigmoid" else 2.0, simpo_gamma=0.5, accelerator=ACC, **cfg)
        if cfg["loss_type"] == "simpo":
            trl_l = cpo_mod.CPOTrainer.cpo_loss(stub, avg[0], avg[1])[0]
            us = L.simpo(chosen_logps=lw, rejected_logps=ll, chosen_lengths=n[0], rejected_lengths=n[1], beta=2.0,
                         gamma=0.5, label_smoothing=cfg["label_smoothing"])
        else:
            trl_l = cpo_mod.CPOTrainer.cpo_loss(stub, lw, ll)[0]
            us = L.cpo(chosen_logps=lw, rejected_logps=ll, cpo_alpha=0.0, beta=0.1, alpha=cfg["alpha"],
                       label_smoothing=cfg["label_smoothing"])
        torch.testing.assert_close(us, trl_l, rtol=1e-6, atol=1e-9)
