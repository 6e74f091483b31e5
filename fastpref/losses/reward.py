"""Reward-model losses on scalar (or small vector) heads.

Inputs (keyword-only): ``chosen_rewards`` / ``rejected_rewards`` [B] (or [B, H] where stated). Returns the
unreduced loss [B].
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._math import f32, logsigmoid, require, smoothed_nll
from .registry import register


def _pair(chosen_rewards: Tensor | None, rejected_rewards: Tensor | None) -> tuple[Tensor, Tensor]:
    require(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    return f32(chosen_rewards), f32(rejected_rewards)


@register("bt")
def bt(
    *, chosen_rewards: Tensor = None, rejected_rewards: Tensor = None, margin: Tensor | float | None = None,
    tau: float = 1.0, label_smoothing: float = 0.0, center_rewards_coefficient: float | None = None,
) -> Tensor:
    """Bradley-Terry reward loss and its common variants:
    L = -(1-ε)·logσ(x) - ε·logσ(-x) + c·(r_w + r_l)²,  x = (r_w - r_l - m)/τ.

    ``margin`` m [B] (Llama-2 margin / TRL ``RewardTrainer`` "margin"; also an adaptive μ̂), ``tau`` τ
    (GPM's PairWiseLoss), ``label_smoothing`` ε (Secrets of RLHF II), ``center_rewards_coefficient`` c (TRL
    reward centering; None = off). Defaults give TRL's plain BT loss -logσ(r_w - r_l).
    """
    r_w, r_l = _pair(chosen_rewards, rejected_rewards)
    x = r_w - r_l if margin is None else r_w - r_l - f32(margin)
    loss = smoothed_nll(x / tau, label_smoothing)
    return loss if center_rewards_coefficient is None else loss + center_rewards_coefficient * (r_w + r_l) ** 2


@register("scaled_bt")
def scaled_bt(*, chosen_rewards: Tensor = None, rejected_rewards: Tensor = None, strength: Tensor = None) -> Tensor:
    """Scaled BT (HelpSteer2-Preference): L = -|m|·logσ(r_w - r_l), ``strength`` m [B] preference strength (1-3)."""
    require(strength=strength)
    r_w, r_l = _pair(chosen_rewards, rejected_rewards)
    return -f32(strength).abs() * logsigmoid(r_w - r_l)


@register("regression")
def regression(*, predictions: Tensor = None, targets: Tensor = None) -> Tensor:
    """Regression reward loss (SteerLM): L = Σ_k (r_k - s_k)² over attribute heads; [B] or [B, A] -> [B]."""
    require(predictions=predictions, targets=targets)
    sq = (f32(predictions) - f32(targets)) ** 2
    return sq.sum(-1) if sq.dim() > 1 else sq


def gpm_score(v_i: Tensor, v_j: Tensor, gates: Tensor | None = None) -> Tensor:
    """Skew-symmetric GPM preference score s(y_i ≻ y_j) = Σ_b λ_b·(v_i[2b]·v_j[2b+1] - v_i[2b+1]·v_j[2b]).

    ``v_i``, ``v_j`` [B, k] (k even); ``gates`` λ [B, k/2] (None = 1). s(i, j) = -s(j, i)."""
    if v_i.shape[-1] % 2:
        raise ValueError(f"GPM embedding dimension must be even, got {v_i.shape[-1]}")
    a, b = f32(v_i), f32(v_j)
    per_block = a[..., 0::2] * b[..., 1::2] - a[..., 1::2] * b[..., 0::2]
    return (per_block if gates is None else f32(gates) * per_block).sum(-1)


@register("gpm")
def gpm(
    *, chosen_embeddings: Tensor = None, rejected_embeddings: Tensor = None, gates: Tensor | None = None,
    margin: Tensor | float = 0.0, tau: float = 0.1,
) -> Tensor:
    """General Preference Model loss (Zhang+24): L = -logσ((s(y_w ≻ y_l) - m)/τ), s = :func:`gpm_score`.

    ``tau`` = 0.1 (paper, k ∈ {4, 6}; 1 for k = 2)."""
    require(chosen_embeddings=chosen_embeddings, rejected_embeddings=rejected_embeddings)
    return -logsigmoid((gpm_score(chosen_embeddings, rejected_embeddings, gates) - f32(margin)) / tau)


@register("lsc")
def lsc(*, rewards: Tensor = None, ref_rewards: Tensor = None) -> Tensor:
    """LSC reward transform (Wang+24, "Transforming and Combining Rewards"): a *utility to maximise*, not a loss.

    u = Σ_p logσ(r_p - r_p^ref): ``rewards`` / ``ref_rewards`` [B] (one property) or [B, P] (summed over P,
    "good on all properties"); r^ref is a per-prompt reference reward. Returns u [B].
    """
    require(rewards=rewards, ref_rewards=ref_rewards)
    u = logsigmoid(f32(rewards) - f32(ref_rewards))
    return u.sum(-1) if u.dim() > 1 else u


@register("micro")
def micro(*, chosen_rewards: Tensor = None, rejected_rewards: Tensor = None, router_logits: Tensor = None) -> Tensor:
    """MiCRo mixture of BT heads: L = -log Σ_k w_k·σ(r_k(y_w) - r_k(y_l)), w = softmax(``router_logits``).

    ``chosen_rewards`` / ``rejected_rewards`` / ``router_logits`` [B, H]; computed as
    -logsumexp_k(log w_k + logσ(Δr_k)). Formula from the abstract (unverified)."""
    require(router_logits=router_logits)
    r_w, r_l = _pair(chosen_rewards, rejected_rewards)
    return -torch.logsumexp(torch.log_softmax(f32(router_logits), -1) + logsigmoid(r_w - r_l), -1)
