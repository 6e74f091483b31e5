"""Listwise / ranking losses over K responses per prompt (a group must hold all K responses).

Inputs (keyword-only): ``logps`` [B, K] summed log-probs of the K responses of each prompt (policy, grad),
``ref_logps`` [B, K], ``lengths`` [B, K] token counts, and the preference information as ``scores`` /
``rewards`` [B, K] (higher = better) or ``ranks`` [B, K] (0 = best). Returns the unreduced loss [B].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._math import f32, lengths_f, logsigmoid, require, reverse_logcumsumexp
from .registry import register


def best_first_order(scores: Tensor | None = None, ranks: Tensor | None = None) -> Tensor:
    """Permutation [B, K] listing responses best first, from ``scores`` (descending) or ``ranks`` (ascending).
    Stable for ties."""
    if (scores is None) == (ranks is None):
        raise ValueError("pass exactly one of scores or ranks")
    key = -f32(scores) if ranks is None else ranks
    return torch.sort(key, dim=-1, stable=True).indices


def _logratios(logps: Tensor | None, ref_logps: Tensor | None) -> Tensor:
    require(logps=logps, ref_logps=ref_logps)
    if logps.dim() != 2 or logps.shape != ref_logps.shape:
        raise ValueError(f"logps and ref_logps must both be [B, K], got {tuple(logps.shape)}, {tuple(ref_logps.shape)}")
    return f32(logps) - f32(ref_logps)


@register("plackett_luce")
def plackett_luce(
    *, logps: Tensor = None, ref_logps: Tensor = None, scores: Tensor | None = None, ranks: Tensor | None = None,
    beta: float = 0.1,
) -> Tensor:
    """Plackett-Luce DPO (Rafailov+23, App. A.3), x = βh in ranking order τ (best first):
    L = -Σ_{k=1}^{K-1} [x_τ(k) - log Σ_{j>=k} exp(x_τ(j))]  (reversed logcumsumexp). K = 2 gives DPO."""
    x = beta * _logratios(logps, ref_logps)
    x = torch.gather(x, -1, best_first_order(scores, ranks))
    return -(x - reverse_logcumsumexp(x, -1)).sum(-1)


@register("pro")
def pro(
    *, logps: Tensor = None, lengths: Tensor = None, rewards: Tensor = None, sft_weight: float = 2.0,
) -> Tensor:
    """PRO (Song+24), no reference model. Responses sorted by reward r_1 > ... > r_K, s_i = ℓ̄_θ(y_i):
    L = Σ_{k<K} [-s_k·T_kk + log(exp(s_k·T_kk) + Σ_{i>k} exp(s_i·T_ki))] + w·(K-1)²·(-ℓ_θ(y_1)),
    T_ki = r_k - r_i (i > k), T_kk = max_{i>k} T_ki. The SFT term uses the *summed* log-prob of the best
    response; ``sft_weight`` w = 2 (config). Uses logsumexp (the official code overflows without max shift).
    """
    require(logps=logps, lengths=lengths, rewards=rewards)
    order = best_first_order(scores=rewards)
    lp = torch.gather(f32(logps), -1, order)
    s = lp / torch.gather(lengths_f(lengths, "lengths"), -1, order)
    r = torch.gather(f32(rewards), -1, order)
    k = r.shape[-1]
    t = r.unsqueeze(-1) - r.unsqueeze(-2)                       # T[b, k, i] = r_k - r_i
    upper = torch.ones(k, k, dtype=torch.bool).triu(1)[:-1]      # stages k < K-1, candidates i > k
    t = t[..., :-1, :]
    neg_inf = torch.full_like(t, -torch.inf)
    diag = s[..., :-1] * torch.where(upper, t, neg_inf).amax(-1)  # s_k·T_kk, T_kk = max_{i>k} T_ki
    logits = torch.where(upper, s.unsqueeze(-2) * t, neg_inf)
    rank_loss = (torch.logsumexp(torch.cat([diag.unsqueeze(-1), logits], -1), -1) - diag).sum(-1)
    return rank_loss + sft_weight * (k - 1) ** 2 * (-lp[..., 0])


@register("lipo_lambda")
def lipo_lambda(
    *, logps: Tensor = None, ref_logps: Tensor = None, relevance: Tensor = None, beta: float = 0.1,
) -> Tensor:
    """LiPO-λ (Liu+24): L = -Σ_{ψ_i > ψ_j} Δ_ij·logσ(s_i - s_j), s = βh,
    Δ_ij = |G_i - G_j|·|1/D(τ_i) - 1/D(τ_j)|, G = 2^ψ - 1, D(τ) = log(1 + τ) (natural log; only rescales
    Δ vs log2), τ_i = 1-based rank of s_i among the K scores (detached). ``relevance`` ψ [B, K] graded
    relevance labels (higher = better; the trainer passes the data's ``scores``, or ``-ranks``).
    Written from the paper's form (no official code)."""
    require(relevance=relevance)
    s = beta * _logratios(logps, ref_logps)
    psi = f32(relevance)
    with torch.no_grad():
        tau = torch.argsort(torch.argsort(-s, dim=-1, stable=True), dim=-1).to(s.dtype) + 1.0
        inv_d = 1.0 / torch.log1p(tau)
        gain = torch.exp2(psi) - 1.0
        w = (gain.unsqueeze(-1) - gain.unsqueeze(-2)).abs() * (inv_d.unsqueeze(-1) - inv_d.unsqueeze(-2)).abs()
        w = w * (psi.unsqueeze(-1) > psi.unsqueeze(-2))
    return -(w * logsigmoid(s.unsqueeze(-1) - s.unsqueeze(-2))).sum((-1, -2))


def _soft_targets(rewards: Tensor | None, alpha: float) -> Tensor:
    require(rewards=rewards)
    return torch.softmax(f32(rewards) / alpha, dim=-1).detach()


@register("infonca")
def infonca(
    *, logps: Tensor = None, ref_logps: Tensor = None, rewards: Tensor = None, beta: float = 0.1, alpha: float = 1.0,
) -> Tensor:
    """InfoNCA (Chen+24): L = -Σ_i softmax_i(r/α)·log softmax_i(βh). ``alpha`` is the reward temperature."""
    return -(_soft_targets(rewards, alpha) * F.log_softmax(beta * _logratios(logps, ref_logps), -1)).sum(-1)


@register("nca")
def nca(
    *, logps: Tensor = None, ref_logps: Tensor = None, rewards: Tensor = None, beta: float = 0.1, alpha: float = 1.0,
) -> Tensor:
    """NCA over K responses (Chen+24): L = -Σ_i [softmax_i(r/α)·logσ(βh_i) + (1/K)·logσ(-βh_i)]."""
    x = beta * _logratios(logps, ref_logps)
    return -(_soft_targets(rewards, alpha) * logsigmoid(x) + logsigmoid(-x) / x.shape[-1]).sum(-1)


@register("exo")
def exo(
    *, logps: Tensor = None, ref_logps: Tensor = None, rewards: Tensor = None,
    beta: float = 0.1, reward_temperature: float = 1.0,
) -> Tensor:
    """EXO over K responses (Ji+24): L = KL(softmax(βh) ‖ softmax(r/τ_r)) = Σ_i q_i·(log q_i - log p_i)."""
    require(rewards=rewards)
    log_q = F.log_softmax(beta * _logratios(logps, ref_logps), -1)
    log_p = F.log_softmax(f32(rewards) / reward_temperature, -1)
    return (log_q.exp() * (log_q - log_p)).sum(-1)


@register("brain")
def brain(
    *, logps: Tensor = None, ref_logps: Tensor = None, proposal_logps: Tensor = None, rewards: Tensor = None,
    reward_beta: float = 1.0,
) -> Tensor:
    """BRAIn (Pandey+24): L = -Σ_i α_i·log softmax_i(ℓ_θ(y_i) - log q(y_i)), samples y_i ~ q,
    α = sg(softmax(r/β_r + ℓ_ref - log q)). Its gradient is BRAIn's -Σ(α_i - β_i)∇ℓ_θ(y_i).
    ``proposal_logps`` log q [B, K] (pass ``ref_logps`` when q = π_ref). Temperatures unverified."""
    require(proposal_logps=proposal_logps, rewards=rewards)
    h = _logratios(logps, ref_logps)
    log_q = f32(proposal_logps)
    target = torch.softmax(f32(rewards) / reward_beta + f32(ref_logps) - log_q, dim=-1).detach()
    return -(target * F.log_softmax(h + f32(ref_logps) - log_q, -1)).sum(-1)


@register("rrhf")
def rrhf(
    *, logps: Tensor = None, lengths: Tensor = None, rewards: Tensor = None, sft_weight: float = 1.0,
) -> Tensor:
    """RRHF (Yuan+23): L = Σ_{r_i < r_j} max(0, p_i - p_j) - w·ℓ_θ(y_best), p = ℓ̄_θ (length-normalised),
    y_best = argmax reward (summed log-prob)."""
    require(logps=logps, lengths=lengths, rewards=rewards)
    lp, r = f32(logps), f32(rewards)
    p = lp / lengths_f(lengths, "lengths")
    worse = r.unsqueeze(-1) < r.unsqueeze(-2)                    # [b, i, j]: r_i < r_j
    rank = (torch.relu(p.unsqueeze(-1) - p.unsqueeze(-2)) * worse).sum((-1, -2))
    best = torch.gather(lp, -1, r.argmax(-1, keepdim=True)).squeeze(-1)
    return rank - sft_weight * best
