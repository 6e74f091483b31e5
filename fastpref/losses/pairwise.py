"""Pairwise preference losses with a reference model: TRL's `DPOTrainer` loss types.

Common inputs (keyword-only, per-sequence *summed* completion log-probs, shape [B], any float dtype;
computation is done in float32 or wider):

* ``chosen_logps`` / ``rejected_logps``: policy ℓ_θ(y_w), ℓ_θ(y_l) (carry the gradient).
* ``ref_chosen_logps`` / ``ref_rejected_logps``: reference ℓ_ref(y_w), ℓ_ref(y_l) (no grad; use zeros for
  TRL's ``reference_free``).

Notation: h_w = ℓ_θ(y_w) - ℓ_ref(y_w), h_l likewise, Δ = s(h_w) - s(h_l) where s is the f-divergence score
(``f_divergence_type``; identity for the default reverse KL, i.e. plain DPO). As in TRL 1.16 the f-divergence
applies to sigmoid, hinge, ipo, exo_pair, robust, discopop and sigmoid_norm only; the other types use h. Every function returns the
*unreduced* per-pair loss [B]; TRL's trainers take ``.mean()``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._math import LN2, check_range, clamped_exp, f32, lengths_f, logsigmoid, require, smoothed_nll
from .registry import register

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
F_EXP_CLAMP = 40.0  # |score| <= e^40 ~ 2e17: squared losses (IPO, SPPO) of it stay finite in fp32


def logratios(
    chosen_logps: Tensor | None, rejected_logps: Tensor | None,
    ref_chosen_logps: Tensor | None, ref_rejected_logps: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """(h_w, h_l) in float32+, raising ValueError naming any missing input."""
    require(chosen_logps=chosen_logps, rejected_logps=rejected_logps,
            ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    return f32(chosen_logps) - f32(ref_chosen_logps), f32(rejected_logps) - f32(ref_rejected_logps)


def f_divergence_scores(h: Tensor, f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5) -> Tensor:
    """f-DPO score s(h) = f'(u) at u = exp(h) (Wang+23, "Beyond Reverse KL"), as in TRL 1.16:

    * ``reverse_kl``: f'(u) = log u + 1, used as s = h (standard DPO)
    * ``forward_kl``: f'(u) = 1 - 1/u  ->  s = 1 - exp(-h)
    * ``js_divergence``: f'(u) = log(2u/(1+u))  ->  s = log 2 + logσ(h)
    * ``alpha_divergence``: **TRL convention** f'(u) = (u^(α-1) - 1)/(α-1)  ->  s = (exp((α-1)h) - 1)/(α-1), with
      α = ``f_alpha_divergence_coef`` (default 0.5); α -> 1 falls back to reverse KL. The f-DPO paper / TRL v0.19
      write (1 - u^(-α'))/α', i.e. α' = 1 - α (identical functions); the two only coincide numerically at 0.5.

    The additive constants cancel in Δ but not in the length-normalised ``ipo`` / ``sigmoid_norm`` (older TRL
    dropped them). Exponents are clamped at 40 (TRL: 80 for α, none for forward KL); both bounds lie far
    beyond any useful score and 40 keeps squared losses such as IPO finite in fp32.
    """
    if f_divergence_type == "reverse_kl":
        return h
    if f_divergence_type == "forward_kl":
        return -torch.expm1(torch.clamp(-h, max=F_EXP_CLAMP))
    if f_divergence_type == "js_divergence":
        return LN2 + logsigmoid(h)
    if f_divergence_type == "alpha_divergence":
        a = f_alpha_divergence_coef
        if abs(a - 1.0) < 1e-6:
            return h
        return torch.expm1(torch.clamp((a - 1.0) * h, max=F_EXP_CLAMP)) / (a - 1.0)
    raise ValueError(f"f_divergence_type must be one of {F_DIVERGENCES}, got {f_divergence_type!r}")


def _scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, f_divergence_type, coef):
    h_w, h_l = logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return f_divergence_scores(h_w, f_divergence_type, coef), f_divergence_scores(h_l, f_divergence_type, coef)


@register("sigmoid")
def sigmoid(
    *, chosen_logps: Tensor = None, rejected_logps: Tensor = None,
    ref_chosen_logps: Tensor = None, ref_rejected_logps: Tensor = None,
    beta: float = 0.1, label_smoothing: float = 0.0, soft_labels: Tensor | None = None,
    f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5,
) -> Tensor:
    """DPO (Rafailov+23) with cDPO label smoothing / per-pair soft labels.

    L = -(1-ε)·logσ(βΔ) - ε·logσ(-βΔ).   ε = ``label_smoothing`` (scalar, cDPO; TRL v0.19 semantics, TRL HEAD
    dropped it from ``sigmoid``; the default 0 is plain DPO in both), or per pair ε_i = 1 - p_i where
    ``soft_labels`` p [B] ∈ [0,1] is P(y_w ≻ y_l) from a judge/RM (soft-label DPO). Bounded below by H(ε).
    """
    if soft_labels is not None:
        if label_smoothing != 0.0:
            raise ValueError("pass either label_smoothing or soft_labels, not both")
        eps: Tensor | float = 1.0 - f32(soft_labels)
    else:
        check_range("label_smoothing", label_smoothing, 0.0, 1.0)
        eps = label_smoothing
    s_w, s_l = _scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                       f_divergence_type, f_alpha_divergence_coef)
    return smoothed_nll(beta * (s_w - s_l), eps)


@register("robust")
def robust(
    *, chosen_logps: Tensor = None, rejected_logps: Tensor = None,
    ref_chosen_logps: Tensor = None, ref_rejected_logps: Tensor = None,
    beta: float = 0.1, label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5,
) -> Tensor:
    """Robust DPO (Chowdhury+24): unbiased loss under label-flip rate ε = ``label_smoothing`` ∈ [0, 0.5).

    L = [(1-ε)·(-logσ(βΔ)) - ε·(-logσ(-βΔ))] / (1-2ε). Unbounded below (slope -εβ/(1-2ε) as Δ -> ∞).
    """
    check_range("label_smoothing", label_smoothing, 0.0, 0.5, hi_open=True)
    s_w, s_l = _scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                       f_divergence_type, f_alpha_divergence_coef)
    x = beta * (s_w - s_l)
    eps = label_smoothing
    return (-(1.0 - eps) * logsigmoid(x) + eps * logsigmoid(-x)) / (1.0 - 2.0 * eps)


@register("hinge")
def hinge(
    *, chosen_logps: Tensor = None, rejected_logps: Tensor = None,
    ref_chosen_logps: Tensor = None, ref_rejected_logps: Tensor = None,
    beta: float = 0.1, f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5,
) -> Tensor:
    """DPO-hinge (SLiC form with a reference): L = max(0, 1 - βΔ)."""
    s_w, s_l = _scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                       f_divergence_type, f_alpha_divergence_coef)
    return torch.relu(1.0 - beta * (s_w - s_l))


@register("ipo")
def ipo(
    *, chosen_logps: Tensor = None, rejected_logps: Tensor = None,
    ref_chosen_logps: Tensor = None, ref_rejected_logps: Tensor = None,
    chosen_lengths: Tensor = None, rejected_lengths: Tensor = None,
    beta: float = 0.1, f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5,
) -> Tensor:
    """IPO (Azar+23) with TRL's per-token normalisation: L = (s_w/|y_w| - s_l/|y_l| - 1/(2τ))², τ = ``beta``.

    ``chosen_lengths`` / ``rejected_lengths`` [B]: completion token counts (clamped to >= 1).
    """
    s_w, s_l = _scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                       f_divergence_type, f_alpha_divergence_coef)
    d = s_w / lengths_f(chosen_lengths, "chosen_lengths") - s_l / lengths_f(rejected_lengths, "rejected_lengths")
    return (d - 1.0 / (2.0 * beta)) ** 2


@register("exo_pair")
def exo_pair(
    *, chosen_logps: Tensor = None, rejected_logps: Tensor = None,
    ref_chosen_logps: Tensor = None, ref_rejected_logps: Tensor = None,
    beta: float = 0.1, label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5,
) -> Tensor:
    """EXO-pref (Ji+24, Eq. 16), K = 2: KL(q ‖ [1-ε, ε]) with q = [σ(βΔ), σ(-βΔ)].

    L = σ(βΔ)·(logσ(βΔ) - log(1-ε)) + σ(-βΔ)·(logσ(-βΔ) - log ε). ε = ``label_smoothing`` must be in (0, 1)
    (TRL rejects 0, its default; the paper uses 1e-3).
    """
    if not 0.0 < label_smoothing < 1.0:
        raise ValueError(f"label_smoothing (EXO's ε) must lie in (0, 1), e.g. 1e-3; got {label_smoothing}")
    s_w, s_l = _scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                       f_divergence_type, f_alpha_divergence_coef)
    x = beta * (s_w - s_l)
    lq_w, lq_l = logsigmoid(x), logsigmoid(-x)
    eps = torch.tensor(label_smoothing, dtype=x.dtype)
    return lq_w.exp() * (lq_w - torch.log1p(-eps)) + lq_l.exp() * (lq_l - torch.log(eps))


@register("nca_pair")
def nca_pair(
    *, chosen_logps: Tensor = None, rejected_logps: Tensor = None,
    ref_chosen_logps: Tensor = None, ref_rejected_logps: Tensor = None,
    beta: float = 0.1,
) -> Tensor:
    """NCA, pair form (Chen+24): L = -logσ(βh_w) - ½·logσ(-βh_w) - ½·logσ(-βh_l)."""
    h_w, h_l = logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    r_w, r_l = beta * h_w, beta * h_l
    return -logsigmoid(r_w) - 0.5 * logsigmoid(-r_w) - 0.5 * logsigmoid(-r_l)


@register("bco_pair")
def bco_pair(
    *, chosen_logps: Tensor = None, rejected_logps: Tensor = None,
    ref_chosen_logps: Tensor = None, ref_rejected_logps: Tensor = None,
    beta: float = 0.1, delta: Tensor | float = 0.0,
) -> Tensor:
    """BCO, pair form (Jung+24): L = -logσ(βh_w - δ) - logσ(-(βh_l - δ)).

    ``delta`` δ: the running mean of all implicit rewards βh, kept and detached by the caller (TRL v0.19
    ``RunningMoments``); the default 0 is current TRL's shift-free ``bco_pair``. It is detached here.
    """
    h_w, h_l = logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    d = f32(delta).detach() if torch.is_tensor(delta) else delta
    return -logsigmoid(beta * h_w - d) - logsigmoid(-(beta * h_l - d))


@register("sppo_hard")
def sppo_hard(
    *, chosen_logps: Tensor = None, rejected_logps: Tensor = None,
    ref_chosen_logps: Tensor = None, ref_rejected_logps: Tensor = None,
    beta: float = 0.1,
) -> Tensor:
    """SPPO with hard win-rates (P_w = 1, P_l = 0), TRL form: L = (h_w - 1/(2β))² + (h_l + 1/(2β))².

    Note: no ½ factor, unlike the soft ``sppo`` of the official code (which this equals ×2 at P = 1, 0).
    """
    h_w, h_l = logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return (h_w - 0.5 / beta) ** 2 + (h_l + 0.5 / beta) ** 2


def _sorted_diff(a: Tensor, b: Tensor) -> Tensor:
    return torch.sort(a, dim=0).values - torch.sort(b, dim=0).values


@register("aot")
def aot(
    *, chosen_logps: Tensor = None, rejected_logps: Tensor = None,
    ref_chosen_logps: Tensor = None, ref_rejected_logps: Tensor = None,
    beta: float = 0.1, label_smoothing: float = 0.0,
) -> Tensor:
    """AOT, paired (Melnyk+24). **Couples the batch**: d = sort_B(ℓ_θ(y_w) - ℓ_θ(y_l)) - sort_B(ℓ_ref(y_w) - ℓ_ref(y_l)),
    L_i = -(1-ε)·logσ(βd_i) - ε·logσ(-βd_i). Entry i is the i-th *sorted* quantile, not pair i.
    """
    logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)  # validates inputs
    pol = f32(chosen_logps) - f32(rejected_logps)
    ref = f32(ref_chosen_logps) - f32(ref_rejected_logps)
    return smoothed_nll(beta * _sorted_diff(pol, ref), label_smoothing)


@register("aot_unpaired")
def aot_unpaired(
    *, chosen_logps: Tensor = None, rejected_logps: Tensor = None,
    ref_chosen_logps: Tensor = None, ref_rejected_logps: Tensor = None,
    beta: float = 0.1, label_smoothing: float = 0.0,
) -> Tensor:
    """AOT, unpaired: d = sort_B(h_w) - sort_B(h_l), L_i = -(1-ε)·logσ(βd_i) - ε·logσ(-βd_i). Batch-coupled."""
    h_w, h_l = logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return smoothed_nll(beta * _sorted_diff(h_w, h_l), label_smoothing)


@register("apo_zero")
def apo_zero(
    *, chosen_logps: Tensor = None, rejected_logps: Tensor = None,
    ref_chosen_logps: Tensor = None, ref_rejected_logps: Tensor = None, beta: float = 0.1,
) -> Tensor:
    """APO-zero (D'Oosterlinck+24, Eq. 7): L = (1 - σ(βh_w)) + σ(βh_l). For chosen outputs better than the model's."""
    h_w, h_l = logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return torch.sigmoid(-beta * h_w) + torch.sigmoid(beta * h_l)


@register("apo_down")
def apo_down(
    *, chosen_logps: Tensor = None, rejected_logps: Tensor = None,
    ref_chosen_logps: Tensor = None, ref_rejected_logps: Tensor = None, beta: float = 0.1,
) -> Tensor:
    """APO-down (Eq. 8): L = σ(βh_w) + (1 - σ(β(h_w - h_l))). For chosen outputs worse than the model's."""
    h_w, h_l = logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return torch.sigmoid(beta * h_w) + torch.sigmoid(-beta * (h_w - h_l))


@register("discopop")
def discopop(
    *, chosen_logps: Tensor = None, rejected_logps: Tensor = None,
    ref_chosen_logps: Tensor = None, ref_rejected_logps: Tensor = None,
    beta: float = 0.1, discopop_tau: float = 0.05,
    f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5,
) -> Tensor:
    """DiscoPOP (Lu+24, Eq. 5), x = βΔ: L = (1 - σ(x/τ))·(-logσ(x)) + σ(x/τ)·exp(-x).

    exp(-x) is clamped at exp(80) so that very negative margins give finite values (TRL does not clamp:
    inf·σ(x/τ) there); the mixing weight σ(x/τ) ~ e^{x/τ} is negligible in that range anyway.
    """
    s_w, s_l = _scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                       f_divergence_type, f_alpha_divergence_coef)
    x = beta * (s_w - s_l)
    w = torch.sigmoid(x / discopop_tau)
    return (1.0 - w) * (-logsigmoid(x)) + w * clamped_exp(-x)


@register("sigmoid_norm")
def sigmoid_norm(
    *, chosen_logps: Tensor = None, rejected_logps: Tensor = None,
    ref_chosen_logps: Tensor = None, ref_rejected_logps: Tensor = None,
    chosen_lengths: Tensor = None, rejected_lengths: Tensor = None,
    beta: float = 0.1, f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5,
) -> Tensor:
    """LN-DPO (length-normalised DPO): L = -logσ(β·(s_w/|y_w| - s_l/|y_l|)); lengths clamped to >= 1."""
    s_w, s_l = _scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                       f_divergence_type, f_alpha_divergence_coef)
    d = s_w / lengths_f(chosen_lengths, "chosen_lengths") - s_l / lengths_f(rejected_lengths, "rejected_lengths")
    return -logsigmoid(beta * d)

