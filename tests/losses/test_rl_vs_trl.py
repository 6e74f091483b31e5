"""Cross-check of the RL losses against TRL's GRPOTrainer._compute_loss (opt-in: FASTPREF_TEST_TRL=1).

TRL's method runs on a stub trainer whose model forward returns given per-token log-probs and entropies; the
loss value, its gradient w.r.t. the log-probs and entropies, and the logged metrics are compared, for every
normalisation ``loss_type`` (grpo, bnpo, dr_grpo, dapo), GSPO (sequence-level ratio), CISPO, with and without
the KL term, δ clipping, the entropy bonus and the sampler importance-sampling correction.
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
grpo_mod = pytest.importorskip("trl.trainer.grpo_trainer")

B, P, T = 6, 3, 9
D64 = torch.float64


def _reduce(x, reduction="sum"):
    return x


ACC = SimpleNamespace(device=torch.device("cpu"), num_processes=1, gather=lambda x: x, reduce=_reduce,
                      gather_for_metrics=lambda x: x, autocast=torch.autocast, sync_gradients=True)


def batch(seed):
    g = gen(seed)
    mask = torch.zeros(B, T, dtype=torch.int64)
    for i in range(B):
        mask[i, :int(torch.randint(1, T + 1, (1,), generator=g))] = 1
    lp = (-torch.rand(B, T, generator=g, dtype=D64) * 3) * mask
    old = (lp + 0.3 * torch.randn(B, T, generator=g, dtype=D64)) * mask
    ref = (lp + 0.5 * torch.randn(B, T, generator=g, dtype=D64)) * mask
    sampler = (old + 0.4 * torch.randn(B, T, generator=g, dtype=D64)) * mask
    ent = torch.rand(B, T, generator=g, dtype=D64) * 2 * mask
    adv = torch.randn(B, generator=g, dtype=D64)
    return dict(mask=mask, lp=lp, old=old, ref=ref, sampler=sampler, ent=ent, adv=adv)


def trl_loss(b, loss_type, beta=0.0, epsilon=0.2, epsilon_high=None, delta=None, level="token", entropy_coef=0.0,
             is_ratio=None, on_policy=False, num_items=None, max_completion_length=T, bias_kl=True):
    lp, ent = b["lp"].clone().requires_grad_(), b["ent"].clone().requires_grad_()
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (lp, ent, None), top_entropy_quantile=1.0,
        off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta, loss_type=loss_type,
        epsilon_low=epsilon, epsilon_high=epsilon if epsilon_high is None else epsilon_high,
        args=SimpleNamespace(delta=delta, use_bias_correction_kl=bias_kl, steps_per_generation=1),
        use_vllm=is_ratio is not None, vllm_importance_sampling_correction=is_ratio is not None,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=max_completion_length, accelerator=ACC, entropy_coef=entropy_coef,
        _entropy_bonus_enabled=entropy_coef != 0.0, use_adaptive_entropy=False, aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, get_off_policy_mask=None)
    m = b["mask"]
    inputs = dict(prompt_ids=torch.ones(B, P, dtype=torch.int64), prompt_mask=torch.ones(B, P, dtype=torch.int64),
                  completion_ids=torch.ones(B, T, dtype=torch.int64), completion_mask=m, advantages=b["adv"],
                  num_items_in_batch=torch.tensor(float(m.sum() if num_items is None else num_items)))
    if not on_policy:
        inputs["old_per_token_logps"] = b["old"]
    if beta:
        inputs["ref_per_token_logps"] = b["ref"]
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = is_ratio
    loss = grpo_mod.GRPOTrainer._compute_loss(stub, None, inputs)
    g_lp, g_ent = torch.autograd.grad(loss, (lp, ent), allow_unused=True, materialize_grads=True)
    metrics = {k: v[-1] for k, v in stub._metrics["train"].items() if k not in ("policy_loss", "entropy_coef")}
    return loss, g_lp * m, g_ent * m, metrics


def ours(b, name, *, is_ratio=None, on_policy=False, num_items=None, max_completion_length=T, **hp):
    lp, ent = b["lp"].clone().requires_grad_(), b["ent"].clone().requires_grad_()
    kw = dict(token_logps=lp, advantages=b["adv"], mask=b["mask"], entropies=ent, ref_token_logps=b["ref"],
              old_token_logps=None if on_policy else b["old"], importance_sampling_ratio=is_ratio,
              max_completion_length=max_completion_length,
              num_items_in_batch=None if num_items is None else torch.tensor(float(num_items)))
    loss = L.get(name)(**kw, **hp).mean()
    g_lp, g_ent = torch.autograd.grad(loss, (lp, ent), allow_unused=True, materialize_grads=True)
    mkw = {k: hp[k] for k in ("epsilon", "epsilon_high", "delta", "use_bias_correction_kl") if k in hp}
    metrics = L.policy_metrics(lp, b["adv"], kw["old_token_logps"], b["mask"], loss=name, entropies=ent,
                               ref_token_logps=b["ref"] if hp.get("beta") else None, **mkw)
    return loss, g_lp, g_ent, metrics


# (fastpref loss, its hyper-parameters) -> TRL config
CASES = [
    *[("grpo", dict(loss_type=lt), dict(loss_type=lt)) for lt in ("grpo", "bnpo", "dr_grpo", "dapo")],
    *[("grpo", dict(loss_type=lt, beta=0.04), dict(loss_type=lt, beta=0.04)) for lt in ("grpo", "bnpo", "dr_grpo",
                                                                                         "dapo")],
    ("grpo", dict(loss_type="bnpo", beta=0.1, use_bias_correction_kl=False),
     dict(loss_type="bnpo", beta=0.1, bias_kl=False)),
    ("grpo", dict(loss_type="grpo", epsilon=0.05, epsilon_high=0.28), dict(loss_type="grpo", epsilon=0.05,
                                                                         epsilon_high=0.28)),
    ("grpo", dict(loss_type="dapo", epsilon=0.05, delta=1.05, beta=0.02),
     dict(loss_type="dapo", epsilon=0.05, delta=1.05, beta=0.02)),
    ("grpo", dict(loss_type="dapo", epsilon=1e9), dict(loss_type="dapo", epsilon=1e9)),  # no clipping
    ("grpo", dict(loss_type="dr_grpo", entropy_coef=0.01, beta=0.04),
     dict(loss_type="dr_grpo", entropy_coef=0.01, beta=0.04)),
    ("grpo", dict(loss_type="dapo", num_items=50), dict(loss_type="dapo", num_items=50)),
    ("grpo", dict(loss_type="dr_grpo", max_completion_length=16), dict(loss_type="dr_grpo", max_completion_length=16)),
    ("grpo", dict(loss_type="dapo", beta=0.04, on_policy=True), dict(loss_type="dapo", beta=0.04, on_policy=True)),
    ("grpo", dict(loss_type="bnpo", beta=0.04, is_mode="token_truncate"),
     dict(loss_type="bnpo", beta=0.04, is_mode="token_truncate")),
    ("grpo", dict(loss_type="grpo", is_mode="sequence_mask"), dict(loss_type="grpo", is_mode="sequence_mask")),
    ("gspo", dict(), dict(loss_type="grpo", level="sequence", epsilon=3e-4, epsilon_high=4e-4)),
    ("gspo", dict(epsilon=0.05, epsilon_high=0.1, beta=0.04),
     dict(loss_type="grpo", level="sequence", epsilon=0.05, epsilon_high=0.1, beta=0.04)),
    ("cispo", dict(epsilon_high=1.1), dict(loss_type="cispo", epsilon_high=1.1)),
    ("cispo", dict(epsilon_high=5.0, beta=0.04, entropy_coef=0.02),
     dict(loss_type="cispo", epsilon_high=5.0, beta=0.04, entropy_coef=0.02)),
]


@pytest.mark.parametrize("name,hp,cfg", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_rl_losses_match_trl_grpo_trainer(name, hp, cfg, seed):
    b = batch(seed)
    hp, cfg = dict(hp), dict(cfg)
    mode = hp.pop("is_mode", None)
    cfg.pop("is_mode", None)
    is_ratio = None
    if mode:
        is_ratio = L.sampler_importance_ratio(b["old"], b["sampler"], b["mask"], mode, clip_min=0.5, clip_max=1.5)
    l_trl, g_trl, ge_trl, m_trl = trl_loss(b, is_ratio=is_ratio, **cfg)
    l_us, g_us, ge_us, m_us = ours(b, name, is_ratio=is_ratio, **hp)
    tol = dict(rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(l_us, l_trl, **tol)
    torch.testing.assert_close(g_us, g_trl, **tol)
    torch.testing.assert_close(ge_us, ge_trl, **tol)
    assert set(m_us) == set(m_trl), (sorted(m_us), sorted(m_trl))
    for k in m_trl:
        assert m_us[k] == pytest.approx(m_trl[k], rel=1e-9, abs=1e-12), k

