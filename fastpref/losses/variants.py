"""DPO variants outside TRL's ``DPOTrainer`` loss types, plus the SFT/NLL term and loss combination.

Inputs follow :mod:`fastpref.losses.pairwise`: keyword-only per-sequence summed log-probs [B]; every function
returns the unreduced per-pair loss [B]. ``prev_*`` tensors are log-probs under the previous iterate π_t.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from ._math import check_range, f32, logsigmoid, require, smoothed_nll
from .pairwise import logratios
from .registry import register


@register("dpop")
def dpop(
    *, chosen_logps: Tensor = None, rejected_logps: Tensor = None,
    ref_chosen_logps: Tensor = None, ref_rejected_logps: Tensor = None,
    beta: float = 0.1, dpop_lambda: float = 50.0,
) -> Tensor:
    """DPO-Positive (Smaug, Pal+24): L = -logσ(β·(Δ - λ·max(0, ℓ_ref(y_w) - ℓ_θ(y_w)))).

    The penalty sits *inside* β·(·) as in the paper (some re-implementations put it outside the logσ).
    ``dpop_lambda`` λ = 50 (paper; unverified against official code).
    """
    h_w, h_l = logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return -logsigmoid(beta * (h_w - h_l - dpop_lambda * torch.relu(-h_w)))


@register("rdpo")
def rdpo(
    *, chosen_logps: Tensor = None, rejected_logps: Tensor = None,
    ref_chosen_logps: Tensor = None, ref_rejected_logps: Tensor = None,
    chosen_lengths: Tensor = None, rejected_lengths: Tensor = None,
    beta: float = 0.1, alpha: float | None = None,
) -> Tensor:
    """R-DPO, length-regularised DPO (Park+24): L = -logσ(βΔ - α·(|y_w| - |y_l|)).

    ``alpha`` α is required (papers use 0.01-0.05). Not the rationale DPO of Just+24 (see ``rdpo_rationale``).
    """
    require(alpha=alpha, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    h_w, h_l = logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return -logsigmoid(beta * (h_w - h_l) - alpha * (f32(chosen_lengths) - f32(rejected_lengths)))


@register("ld_dpo")
def ld_dpo(
    *, chosen_shared_logps: Tensor = None, chosen_tail_logps: Tensor = None,
    rejected_shared_logps: Tensor = None, rejected_tail_logps: Tensor = None,
    ref_chosen_shared_logps: Tensor = None, ref_chosen_tail_logps: Tensor = None,
    ref_rejected_shared_logps: Tensor = None, ref_rejected_tail_logps: Tensor = None,
    ld_alpha: float | None = None, beta: float = 0.1, label_smoothing: float = 0.0,
) -> Tensor:
    """LD-DPO (Liu+24, TRL ``ld_alpha``): DPO on ℓ̃(y) = Σ_{t<=s} log π(y_t) + α·Σ_{t>s} log π(y_t).

    s = min(|y_w|, |y_l|) per pair. ``*_shared_logps`` are the sums over the first s completion tokens and
    ``*_tail_logps`` the sums over the rest, for policy and reference, chosen and rejected ([B] each); get them
    from :func:`fastpref.losses.reduce.ld_dpo_partial_sums`. ``ld_alpha`` α ∈ [0, 1] is required (α = 1 is DPO).
    """
    require(ld_alpha=ld_alpha)
    check_range("ld_alpha", ld_alpha, 0.0, 1.0)
    parts = dict(chosen_shared_logps=chosen_shared_logps, chosen_tail_logps=chosen_tail_logps,
                 rejected_shared_logps=rejected_shared_logps, rejected_tail_logps=rejected_tail_logps,
                 ref_chosen_shared_logps=ref_chosen_shared_logps, ref_chosen_tail_logps=ref_chosen_tail_logps,
                 ref_rejected_shared_logps=ref_rejected_shared_logps, ref_rejected_tail_logps=ref_rejected_tail_logps)
    require(**parts)

    def mix(prefix: str) -> Tensor:
        return f32(parts[f"{prefix}_shared_logps"]) + ld_alpha * f32(parts[f"{prefix}_tail_logps"])

    h_w = mix("chosen") - mix("ref_chosen")
    h_l = mix("rejected") - mix("ref_rejected")
    return smoothed_nll(beta * (h_w - h_l), label_smoothing)


@register("cal_dpo")
def cal_dpo(
    *, chosen_logps: Tensor = None, rejected_logps: Tensor = None,
    ref_chosen_logps: Tensor = None, ref_rejected_logps: Tensor = None, beta: float = 0.1,
) -> Tensor:
    """Cal-DPO (Xiao+24): L = -logσ(h_w - h_l) + (h_w - 1/(2β))² + (h_l + 1/(2β))² (calibrated rewards)."""
    h_w, h_l = logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return -logsigmoid(h_w - h_l) + (h_w - 0.5 / beta) ** 2 + (h_l + 0.5 / beta) ** 2


@register("flex_dpo")
def flex_dpo(
    *, chosen_logps: Tensor = None, rejected_logps: Tensor = None,
    ref_chosen_logps: Tensor = None, ref_rejected_logps: Tensor = None,
    beta_chosen: float = 0.1, beta_rejected: float = 0.1,
) -> Tensor:
    """Flex-DPO (3D-Properties, Yan+24): L = -logσ(β_w·h_w - β_l·h_l); β_l > β_w slows the rejected-logp drop.
    Either β may be a [B] tensor (adaptive schedule computed by the caller)."""
    h_w, h_l = logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return -logsigmoid(beta_chosen * h_w - beta_rejected * h_l)


def _squared_targets(h_w: Tensor, h_l: Tensor, t_w: Tensor, t_l: Tensor) -> Tensor:
    return 0.5 * ((h_w - t_w) ** 2 + (h_l - t_l) ** 2)


@register("sppo")
def sppo(
    *, chosen_logps: Tensor = None, rejected_logps: Tensor = None,
    prev_chosen_logps: Tensor = None, prev_rejected_logps: Tensor = None,
    chosen_winrates: Tensor = None, rejected_winrates: Tensor = None, beta: float = 0.001,
) -> Tensor:
    """SPPO, soft win-rates (Wu+24, official ``loss_type="sppo"``): h = ℓ_θ - ℓ_t (π_t = previous iterate),
    L = ½·[(h_w - (P̂_w - ½)/β)² + (h_l - (P̂_l - ½)/β)²].

    ``chosen_winrates`` / ``rejected_winrates`` P̂ [B]: win-rate of y against the K samples of π_t (row mean of
    σ(s(y) - s(y_j)), self included). β = 1e-3 (official pipeline), so targets reach ±500 nats.
    """
    require(chosen_winrates=chosen_winrates, rejected_winrates=rejected_winrates,
            prev_chosen_logps=prev_chosen_logps, prev_rejected_logps=prev_rejected_logps)
    h_w, h_l = logratios(chosen_logps, rejected_logps, prev_chosen_logps, prev_rejected_logps)
    return _squared_targets(h_w, h_l, (f32(chosen_winrates) - 0.5) / beta, (f32(rejected_winrates) - 0.5) / beta)


@register("gpo")
def gpo(
    *, chosen_logps: Tensor = None, rejected_logps: Tensor = None,
    prev_chosen_logps: Tensor = None, prev_rejected_logps: Tensor = None,
    chosen_scores: Tensor = None, rejected_scores: Tensor = None, beta: float = 0.001,
) -> Tensor:
    """GPO with GPM scores (Zhang+24): SPPO with P̂ - ½ replaced by the skew-symmetric preference score
    ŝ(y) = mean_j [s(y ≻ y_j) - s(y_j ≻ y)] = 2·mean_j s(y ≻ y_j) [B] (tie = 0; the official data pipeline's
    t_ij - t_ji): L = ½·[(h_w - ŝ_w/β)² + (h_l - ŝ_l/β)²]. Loss body inferred from that pipeline (its trainer
    is unpublished)."""
    require(chosen_scores=chosen_scores, rejected_scores=rejected_scores,
            prev_chosen_logps=prev_chosen_logps, prev_rejected_logps=prev_rejected_logps)
    h_w, h_l = logratios(chosen_logps, rejected_logps, prev_chosen_logps, prev_rejected_logps)
    return _squared_targets(h_w, h_l, f32(chosen_scores) / beta, f32(rejected_scores) / beta)


@register("inpo")
def inpo(
    *, chosen_logps: Tensor = None, rejected_logps: Tensor = None,
    ref_chosen_logps: Tensor = None, ref_rejected_logps: Tensor = None,
    prev_chosen_logps: Tensor = None, prev_rejected_logps: Tensor = None,
    pref_probs: Tensor | None = None, tau: float | None = None, eta: float | None = None,
) -> Tensor:
    """INPO (Zhang+24): L = (g - 1/(2η))² with
    g = [ℓ_θ(y_w) - ℓ_θ(y_l)] - (τ/η)·[ℓ_ref(y_w) - ℓ_ref(y_l)] - ((η-τ)/η)·[ℓ_t(y_w) - ℓ_t(y_l)].

    ``pref_probs`` P = P(y_w ≻ y_l) [B] (optional): the paper's expectation over the label drawn from
    Bernoulli(P), L = P·(g - 1/(2η))² + (1-P)·(g + 1/(2η))², minimised at g* = (2P - 1)/(2η); without it the
    label is given (P = 1). τ: KL-to-reference strength, η: mirror-descent step; both required.
    """
    require(tau=tau, eta=eta, prev_chosen_logps=prev_chosen_logps, prev_rejected_logps=prev_rejected_logps)
    logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)  # validates inputs
    pol = f32(chosen_logps) - f32(rejected_logps)
    ref = f32(ref_chosen_logps) - f32(ref_rejected_logps)
    prev = f32(prev_chosen_logps) - f32(prev_rejected_logps)
    g = pol - (tau / eta) * ref - ((eta - tau) / eta) * prev
    if pref_probs is None:
        return (g - 0.5 / eta) ** 2
    p = f32(pref_probs)
    return p * (g - 0.5 / eta) ** 2 + (1 - p) * (g + 0.5 / eta) ** 2


@register("online_ipo", "egpo")
def online_ipo(
    *, logps: Tensor = None, other_logps: Tensor = None, ref_logps: Tensor = None, ref_other_logps: Tensor = None,
    pref_probs: Tensor = None, other_pref_probs: Tensor | float = 0.5, beta: float = 0.1,
) -> Tensor:
    """Online IPO as used by EGPO (Zhou+25); EGPO itself is the extragradient *optimiser* over this loss.

    L = ([h(y) - h(y')] - (P(y ≻ y'') - P(y' ≻ y''))/β)², h = ℓ_θ - ℓ_ref, y'' a detached policy sample:
    ``pref_probs`` = P(y ≻ y''), ``other_pref_probs`` = P(y' ≻ y'') [B] (IPO-1). For IPO-2 pass
    ``pref_probs`` = P(y ≻ y') and keep ``other_pref_probs`` = ½.
    """
    require(pref_probs=pref_probs)
    h, h_o = logratios(logps, other_logps, ref_logps, ref_other_logps)
    return (h - h_o - (f32(pref_probs) - f32(other_pref_probs)) / beta) ** 2


@register("rpo")
def rpo(
    *, chosen_logps: Tensor = None, rejected_logps: Tensor = None,
    ref_chosen_logps: Tensor = None, ref_rejected_logps: Tensor = None,
    chosen_nll: Tensor = None, beta: float = 0.1, rpo_alpha: float = 1.0,
) -> Tensor:
    """RPO / SFT-DPO (Pang+24): L = -logσ(βΔ) + α·NLL(y_w).

    ``chosen_nll`` [B] or scalar: token-mean NLL of the chosen completion, e.g. -ℓ_θ(y_w)/|y_w| (per pair) or
    :func:`sft` (TRL's batch token-mean). ``rpo_alpha`` α = 1.0 (paper).
    """
    require(chosen_nll=chosen_nll)
    h_w, h_l = logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return -logsigmoid(beta * (h_w - h_l)) + rpo_alpha * f32(chosen_nll)


@register("sft")
def sft(*, chosen_logps: Tensor = None, chosen_lengths: Tensor = None, per_sequence: bool = False) -> Tensor:
    """SFT / NLL term on the chosen completions (TRL ``loss_type="sft"``, the RPO term).

    TRL semantics (default): one token-mean cross-entropy over *all* chosen tokens of the batch,
    -Σ_i ℓ_θ(y_w,i) / Σ_i |y_w,i|, broadcast to [B] (so ``.mean()`` equals TRL's value). With
    ``per_sequence=True``: -ℓ_θ(y_w,i)/|y_w,i| per pair (the RPO paper's form). Lengths clamped to >= 1.
    """
    require(chosen_logps=chosen_logps, chosen_lengths=chosen_lengths)
    lp, n = f32(chosen_logps), f32(chosen_lengths)
    if per_sequence:
        return -lp / n.clamp(min=1.0)
    return (-lp.sum() / n.sum().clamp(min=1.0)).expand(lp.shape)


def combine(losses: Mapping[str, Tensor], weights: Mapping[str, float] | None = None) -> Tensor:
    """Weighted sum of per-example losses (TRL ``loss_type=[...]`` + ``loss_weights``): Σ_k w_k·L_k, [B].

    Missing weights default to 1. TRL averages each term before weighting; for [B] terms this is identical
    after ``.mean()``.
    """
    if not losses:
        raise ValueError("losses must contain at least one term")
    weights = dict(weights or {})
    unknown = set(weights) - set(losses)
    if unknown:
        raise ValueError(f"weights given for unknown terms: {sorted(unknown)}")
    return sum(weights.get(k, 1.0) * f32(v) for k, v in losses.items())


@register("xpo")
def xpo(*, ref_sample_logps: Tensor = None, alpha: float = 1e-5) -> Tensor:
    """XPO exploration term (Xie+24, TRL ``XPOTrainer``): α·ℓ_θ(y_ref), y_ref ~ π_ref, [B].
    Add to a DPO/IPO loss on the judged (policy, reference) sample pair. α = 1e-5 (TRL)."""
    require(ref_sample_logps=ref_sample_logps)
    return alpha * f32(ref_sample_logps)


@register("vpo")
def vpo(*, logps: Tensor = None, alpha: float | None = None, beta: float = 0.1, optimistic: bool = True) -> Tensor:
    """VPO value regulariser (Cen+24): sign·α·β·ℓ_θ(y), [B], added to a DPO loss.

    ``optimistic=True`` (online): sign = +1 with y ~ π_ref (≈ XPO). ``optimistic=False`` (offline, pessimistic):
    sign = -1 on data responses (an SFT-like term). ``alpha`` is required; sign convention unverified
    against the paper.
    """
    require(logps=logps, alpha=alpha)
    return (1.0 if optimistic else -1.0) * alpha * beta * f32(logps)


@register("rdpo_rationale")
def rdpo_rationale(
    *, chosen_logps: Tensor = None, rejected_logps: Tensor = None,
    ref_chosen_logps: Tensor = None, ref_rejected_logps: Tensor = None,
    rationale_logps: Tensor = None, beta: float = 0.1, gamma: float = 0.1,
) -> Tensor:
    """Rationale-augmented DPO (Just+24, official code): L = -logσ(βΔ) - logσ(γ·ℓ_θ(r | x, y_w, y_l)).

    ``rationale_logps`` [B]: summed policy log-prob of the rationale. γ = 0.1 (config). Follows the official
    code's logσ on the summed rationale log-prob (it saturates for long rationales).
    """
    require(rationale_logps=rationale_logps)
    h_w, h_l = logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return -logsigmoid(beta * (h_w - h_l)) - logsigmoid(gamma * f32(rationale_logps))

