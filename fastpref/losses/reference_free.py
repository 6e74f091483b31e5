"""Reference-free pairwise losses (no π_ref): SimPO, CPO (+AlphaPO), ORPO, R-ORPO, ASFT, SLiC-HF.

Inputs are keyword-only per-sequence *summed* completion log-probs [B] (``chosen_logps``, ``rejected_logps``)
and, where a length-normalised log-prob ℓ̄ = ℓ/|y| is needed, token counts ``chosen_lengths`` /
``rejected_lengths`` [B] (clamped to >= 1). NLL terms are explicit inputs (``chosen_nll``: scalar or [B]),
because the trainers compute them over different token sets (e.g. ORPO over prompt + completion).
Each function returns the unreduced per-pair loss [B].
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._math import EXP_CLAMP, f32, lengths_f, log1mexp, logsigmoid, require, smoothed_nll
from .registry import register

_MAX_AVG_LOGP = -1e-20  # ℓ̄ <= -1e-20 keeps log(1 - exp(ℓ̄)) and its gradient (~1/ℓ̄) finite in fp32


def _avg(logps: Tensor | None, lengths: Tensor | None, name: str) -> Tensor:
    require(**{f"{name}_logps": logps})
    return f32(logps) / lengths_f(lengths, f"{name}_lengths")


def log_odds(avg_logps: Tensor) -> Tensor:
    """log(p / (1 - p)) for p = exp(ℓ̄), via log1mexp; ℓ̄ is clamped to <= -1e-20 (TRL: no clamp, inf at ℓ̄ = 0)."""
    x = avg_logps.clamp(max=_MAX_AVG_LOGP)
    return x - log1mexp(x)


@register("simpo")
def simpo(
    *, chosen_logps: Tensor = None, rejected_logps: Tensor = None,
    chosen_lengths: Tensor = None, rejected_lengths: Tensor = None,
    beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0,
) -> Tensor:
    """SimPO (Meng+24): L = -(1-ε)·logσ(x) - ε·logσ(-x), x = β·(ℓ̄_w - ℓ̄_l) - γ.

    ``gamma`` γ is the *absolute* margin (as TRL-CPO's ``simpo_gamma``); SimPO's configs give the ratio
    γ/β, so pass gamma = beta·gamma_beta_ratio. Defaults β = 2.0, γ = 0.5 (the SimPO code's β = 2, γ/β = 0.25).
    """
    x = beta * (_avg(chosen_logps, chosen_lengths, "chosen") - _avg(rejected_logps, rejected_lengths, "rejected"))
    return smoothed_nll(x - gamma, label_smoothing)


def alphapo_reward(logps: Tensor, alpha: float) -> Tensor:
    """AlphaPO reward shape r = (1 - p^(-α))/α with p = exp(ℓ), as -expm1(-α·ℓ)/α (exponent clamped at 80)."""
    return -torch.expm1(torch.clamp(-alpha * logps, max=EXP_CLAMP)) / alpha


@register("cpo")
def cpo(
    *, chosen_logps: Tensor = None, rejected_logps: Tensor = None, chosen_nll: Tensor | None = None,
    beta: float = 0.1, label_smoothing: float = 0.0, cpo_alpha: float = 1.0, alpha: float = 0.0,
) -> Tensor:
    """CPO (Xu+24; TRL ``CPOTrainer``, ``loss_type="sigmoid"``):
    L = -(1-ε)·logσ(β·(r_w - r_l)) - ε·logσ(-β·(r_w - r_l)) + λ·NLL(y_w).

    r = ℓ (the given log-probs; TRL sums them, or averages them for its ipo/simpo types), or with AlphaPO
    (``alpha`` ≠ 0) r = (1 - p^(-α))/α, p = exp(ℓ). ``cpo_alpha`` λ = 1.0 weights the behaviour-cloning term;
    ``chosen_nll`` (TRL: token-mean CE over the chosen sequences) is required unless λ = 0.
    """
    require(chosen_logps=chosen_logps, rejected_logps=rejected_logps)
    if cpo_alpha != 0.0:
        require(chosen_nll=chosen_nll)
    r_w, r_l = f32(chosen_logps), f32(rejected_logps)
    if alpha != 0.0:
        r_w, r_l = alphapo_reward(r_w, alpha), alphapo_reward(r_l, alpha)
    loss = smoothed_nll(beta * (r_w - r_l), label_smoothing)
    return loss if cpo_alpha == 0.0 else loss + cpo_alpha * f32(chosen_nll)


@register("orpo")
def orpo(
    *, chosen_logps: Tensor = None, rejected_logps: Tensor = None,
    chosen_lengths: Tensor = None, rejected_lengths: Tensor = None,
    chosen_nll: Tensor = None, beta: float = 0.1,
) -> Tensor:
    """ORPO (Hong+24; TRL ``ORPOTrainer``): L = NLL(y_w) - λ·logσ(logodds(y_w) - logodds(y_l)),
    logodds(y) = ℓ̄ - log(1 - exp(ℓ̄)) with ℓ̄ the average log-prob (log1mexp, fp32).

    ``beta`` λ = 0.1. ``chosen_nll``: TRL uses the token-mean NLL over the chosen prompt + completion.
    """
    require(chosen_nll=chosen_nll)
    lo_w = log_odds(_avg(chosen_logps, chosen_lengths, "chosen"))
    lo_l = log_odds(_avg(rejected_logps, rejected_lengths, "rejected"))
    return f32(chosen_nll) - beta * logsigmoid(lo_w - lo_l)


@register("rorpo")
def rorpo(
    *, chosen_logps: Tensor = None, rejected_logps: Tensor = None,
    chosen_lengths: Tensor = None, rejected_lengths: Tensor = None,
    chosen_nll: Tensor = None, rationale_logps: Tensor = None, beta: float = 0.1, gamma: float = 1.0,
) -> Tensor:
    """R-ORPO, rationale-augmented ORPO (Just+24, official ``SimpleRORPOTrainer``):
    L = NLL(y_w) - [λ·logσ(logodds(y_w) - logodds(y_l)) + γ·ℓ_θ(r | x, y_w, y_l)].

    ``rationale_logps`` [B]: summed log-prob of a machine-generated rationale r conditioned on the prompt and
    both responses. ``beta`` λ = 0.1, ``gamma`` γ = 1.0 (official config). The official code uses the naive
    log1p(-exp); this uses log1mexp, as ORPO here does.
    """
    require(chosen_nll=chosen_nll, rationale_logps=rationale_logps)
    lo_w = log_odds(_avg(chosen_logps, chosen_lengths, "chosen"))
    lo_l = log_odds(_avg(rejected_logps, rejected_lengths, "rejected"))
    return f32(chosen_nll) - (beta * logsigmoid(lo_w - lo_l) + gamma * f32(rationale_logps))


@register("asft")
def asft(
    *, chosen_logps: Tensor = None, rejected_logps: Tensor = None,
    chosen_lengths: Tensor = None, rejected_lengths: Tensor = None,
    chosen_nll: Tensor = None, beta: float = 0.1,
) -> Tensor:
    """ASFT (Aligned SFT, Wang+24): L = NLL(y_w) - λ·[logσ(logodds(y_w)) + logσ(-logodds(y_l))].

    Since σ(logodds(y)) = p(y) = exp(ℓ̄), this is computed as NLL(y_w) - λ·(ℓ̄_w + log(1 - exp(ℓ̄_l))).
    ``beta`` λ = 0.1 (default unverified).
    """
    require(chosen_nll=chosen_nll)
    avg_w = _avg(chosen_logps, chosen_lengths, "chosen")
    avg_l = _avg(rejected_logps, rejected_lengths, "rejected").clamp(max=_MAX_AVG_LOGP)
    return f32(chosen_nll) - beta * (avg_w + log1mexp(avg_l))


@register("slic")
def slic(
    *, chosen_logps: Tensor = None, rejected_logps: Tensor = None, sft_target_logps: Tensor | None = None,
    delta: float = 1.0, reg_lambda: float = 0.1,
) -> Tensor:
    """SLiC-HF (Zhao+23): L = max(0, δ - ℓ_θ(y_w) + ℓ_θ(y_l)) - λ·ℓ_θ(y_ref).

    ``sft_target_logps`` ℓ_θ(y_ref) [B] defaults to ``chosen_logps`` (as HALOs). δ = 1.0, λ = 0.1.
    """
    require(chosen_logps=chosen_logps, rejected_logps=rejected_logps)
    lw, ll = f32(chosen_logps), f32(rejected_logps)
    target = lw if sft_target_logps is None else f32(sft_target_logps)
    return torch.relu(delta - lw + ll) - reg_lambda * target
