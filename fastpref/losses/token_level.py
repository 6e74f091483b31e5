"""Token-level losses and weights: TDPO1/2, TGDPO, Nash-MD-PG, WPO weights.

Per-token inputs are [B, T] target-token log-probs; ``*_mask`` [B, T] (1 = completion token; None = all
positions count, i.e. the tensors already hold zeros at ignored positions). Returns [B].
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._math import f32, logsigmoid, require
from .reduce import masked_sums
from .registry import register


def _sum(x: Tensor, mask: Tensor | None) -> Tensor:
    return masked_sums(x, mask)[0]


def _tdpo(lp_w, lp_l, ref_w, ref_l, kl_w, kl_l, m_w, m_l, beta: float, alpha: float, stop_chosen_kl: bool) -> Tensor:
    require(chosen_token_logps=lp_w, rejected_token_logps=lp_l, ref_chosen_token_logps=ref_w,
            ref_rejected_token_logps=ref_l, chosen_token_kl=kl_w, rejected_token_kl=kl_l)
    delta = _sum(f32(lp_w) - f32(ref_w), m_w) - _sum(f32(lp_l) - f32(ref_l), m_l)
    d_w, d_l = _sum(kl_w, m_w), _sum(kl_l, m_l)
    if stop_chosen_kl:
        d_w = d_w.detach()
    return -logsigmoid(beta * (delta - alpha * (d_l - d_w)))


_TDPO_INPUTS = """
    Inputs: ``chosen_token_logps`` / ``rejected_token_logps`` (policy, grad), ``ref_chosen_token_logps`` /
    ``ref_rejected_token_logps`` [B, T]; ``chosen_token_kl`` / ``rejected_token_kl`` [B, T]: per-token
    KL_t(π_ref ‖ π_θ) = Σ_v π_ref(v|s_t)(log π_ref - log π_θ) over the full vocabulary (from the fused
    kernel; its gradient flows back through it); D(y) = Σ_t m_t·KL_t; Δ = Σ_t m_t·h_t(y_w) - Σ_t m_t·h_t(y_l).
    Masks optional.
    """


@register("tdpo1")
def tdpo1(
    *, chosen_token_logps: Tensor = None, rejected_token_logps: Tensor = None,
    ref_chosen_token_logps: Tensor = None, ref_rejected_token_logps: Tensor = None,
    chosen_token_kl: Tensor = None, rejected_token_kl: Tensor = None,
    chosen_mask: Tensor | None = None, rejected_mask: Tensor | None = None, beta: float = 0.1,
) -> Tensor:
    return _tdpo(chosen_token_logps, rejected_token_logps, ref_chosen_token_logps, ref_rejected_token_logps,
                 chosen_token_kl, rejected_token_kl, chosen_mask, rejected_mask, beta, 1.0, False)


@register("tdpo2")
def tdpo2(
    *, chosen_token_logps: Tensor = None, rejected_token_logps: Tensor = None,
    ref_chosen_token_logps: Tensor = None, ref_rejected_token_logps: Tensor = None,
    chosen_token_kl: Tensor = None, rejected_token_kl: Tensor = None,
    chosen_mask: Tensor | None = None, rejected_mask: Tensor | None = None, beta: float = 0.1, alpha: float = 0.5,
) -> Tensor:
    return _tdpo(chosen_token_logps, rejected_token_logps, ref_chosen_token_logps, ref_rejected_token_logps,
                 chosen_token_kl, rejected_token_kl, chosen_mask, rejected_mask, beta, alpha, True)


tdpo1.__doc__ = "TDPO1 (Zeng+24): L = -logσ(β·[Δ - (D(y_l) - D(y_w))]).\n" + _TDPO_INPUTS
tdpo2.__doc__ = ("TDPO2 (Zeng+24): L = -logσ(β·[Δ - α·(D(y_l) - sg(D(y_w)))]), α = 0.5; stop-gradient on "
                 "D(y_w) only.\n" + _TDPO_INPUTS)


@register("tgdpo")
def tgdpo(
    *, chosen_token_logps: Tensor = None, rejected_token_logps: Tensor = None,
    ref_chosen_token_logps: Tensor = None, ref_rejected_token_logps: Tensor = None,
    rm_chosen_token_logps: Tensor = None, rm_rejected_token_logps: Tensor = None,
    chosen_mask: Tensor | None = None, rejected_mask: Tensor | None = None, beta: float = 0.1, alpha: float = 0.5,
) -> Tensor:
    """TGDPO (Zhu+25): L = -logσ(Σ_t β(1 + αβ·r̂^w_t)·h^w_t - Σ_t β(1 - αβ·r̂^l_t)·h^l_t).

    h_t = log π_θ(y_t) - log π_ref(y_t); r̂_t = log π_rm(y_t) - log π_ref(y_t) from a frozen token-reward model
    (``rm_*_token_logps`` [B, T], same tokenizer). Token weights are detached and, as in the official code,
    not clamped (they can turn negative when αβ·r̂^l_t > 1).
    """
    require(chosen_token_logps=chosen_token_logps, rejected_token_logps=rejected_token_logps,
            ref_chosen_token_logps=ref_chosen_token_logps, ref_rejected_token_logps=ref_rejected_token_logps,
            rm_chosen_token_logps=rm_chosen_token_logps, rm_rejected_token_logps=rm_rejected_token_logps)
    ref_w, ref_l = f32(ref_chosen_token_logps), f32(ref_rejected_token_logps)
    w_w = (beta * (1.0 + alpha * beta * (f32(rm_chosen_token_logps) - ref_w))).detach()
    w_l = (beta * (1.0 - alpha * beta * (f32(rm_rejected_token_logps) - ref_l))).detach()
    s_w = _sum(w_w * (f32(chosen_token_logps) - ref_w), chosen_mask)
    s_l = _sum(w_l * (f32(rejected_token_logps) - ref_l), rejected_mask)
    return -logsigmoid(s_w - s_l)


@register("nash_md")
def nash_md(
    *, token_logps: Tensor = None, ref_token_logps: Tensor = None, probability: Tensor = None,
    mask: Tensor | None = None, beta: float = 0.1,
) -> Tensor:
    """Nash-MD-PG (Munos+23; TRL ``NashMDTrainer``) for y ~ π_θ scored against a mixture sample y':
    L = β·Σ_t sg(log π_θ(y_t) - log π_ref(y_t))·log π_θ(y_t) - (P(y ≻ y') - ½)·Σ_t log π_θ(y_t).

    ``probability`` [B]: judge/RM probability P(y ≻ y'). REINFORCE with a per-token KL estimator.
    """
    require(token_logps=token_logps, ref_token_logps=ref_token_logps, probability=probability)
    lp = f32(token_logps)
    kl_term = _sum((lp - f32(ref_token_logps)).detach() * lp, mask)
    return beta * kl_term - (f32(probability) - 0.5) * _sum(lp, mask)


def wpo_weights(token_logps: Tensor, log_sum_p2: Tensor, mask: Tensor | None = None) -> Tensor:
    """WPO per-sequence weight (Zhou+24, TRL ``use_weighting``), detached, [B]:
    w(y) = exp((1/|y|)·Σ_t m_t·[log π_θ(y_t) - log Σ_v π_θ(v)²]).

    ``log_sum_p2`` [B, T]: per-token log Σ_v p_v² = lse(2z) - 2·lse(z) from the vocab sweep. Multiply a pairwise
    loss by w(y_w)·w(y_l) (TRL HEAD does not clamp; v0.19 clamped the pair weight at 1).
    """
    s, n = masked_sums(f32(token_logps) - f32(log_sum_p2), mask)
    return torch.exp(s / n.clamp(min=1)).detach()
