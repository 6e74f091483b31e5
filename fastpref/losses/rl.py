"""On-policy RL policy losses: PPO-clip / GRPO (TRL's ``loss_type`` normalisations), GSPO, CISPO.

Per-token inputs are [B, T] over the sampled completion tokens y_t (names as in TRL's ``GRPOTrainer``):

* ``token_logps``: log π_θ(y_t | s_t), with gradient (``fastpref.token_stats`` / ``token_logprobs``).
* ``old_token_logps``: log π_old(y_t), the policy that generated the batch as the trainer scores it; ``None``
  means one update per batch (π_old = sg(π_θ): ratio 1, gradient = the policy gradient).
* ``advantages``: [B] per sequence (GRPO's group-normalised reward) or [B, T] per token.
* ``mask``: [B, T], 1 = completion token that counts (``None``: every position counts).
* ``importance_sampling_ratio``: [B, T] or [B, 1], detached: correction for completions sampled by another
  engine (vLLM, SGLang), built by :func:`sampler_importance_ratio` from the sampler's log-probs.
* ``ref_token_logps``: log π_ref(y_t), for the sampled KL estimator; or ``token_kl``: the exact per-position
  KL(π_θ ‖ π_ref) over the whole vocabulary (``fastpref.token_kl(..., direction="reverse")``, with gradient).
* ``entropies``: H(π_θ(· | s_t)) with gradient (``fastpref.token_stats(..., entropy=True)``).

Every loss returns [B]: each sequence's share of the batch loss, so that ``.mean()`` is the loss TRL's
``GRPOTrainer`` computes for the same ``loss_type`` on one device without gradient accumulation.

Objective (per token t of sequence i, r = π_θ/π_old, w = ``importance_sampling_ratio``):
    ℓ_{i,t} = w_{i,t} · ψ(r_{i,t}, A_{i,t}) + β · KL_{i,t}
    L = N(ℓ) - c_H · mean_t H_{i,t}
where ψ is the loss's surrogate, N the ``loss_type`` normalisation (:func:`normalise`) and c_H
``entropy_coef`` (the bonus is always a token mean over the batch, whatever N is, as in TRL).
"""
from __future__ import annotations

import inspect

import torch
from torch import Tensor

from ._math import clamped_exp, f32, require
from .kl_estimators import k1, k2, k3
from .registry import get, register

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_SAMPLING_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
KL_ESTIMATORS = {"k1": k1, "k2": k2, "k3": k3}
# The expected gradient of β·k on tokens sampled from π_old = π_θ, with and without ``use_bias_correction_kl``
# (the estimate times r = π_θ/π_old): E[r·k] has gradient E[(k + ∂k/∂ρ)·∇log π], E[k] has E[∂k/∂ρ·∇log π].
KL_GRADIENTS = {
    ("k1", True): "reverse",   # E[(ρ + 1)∇log π] = ∇KL(π_θ‖π_ref)
    ("k3", True): "reverse",   # E[(e^{-ρ} + ρ - 1 + 1 - e^{-ρ})∇log π] = ∇KL(π_θ‖π_ref)
    ("k2", True): "biased",    # E[(ρ + ρ²/2)∇log π]: neither KL's gradient
    ("k1", False): "zero",     # E[∇log π] = 0
    ("k2", False): "reverse",  # E[ρ∇log π] = ∇KL(π_θ‖π_ref)
    ("k3", False): "forward",  # E[(1 - π_ref/π_θ)∇log π] = ∇KL(π_ref‖π_θ)
}


def _bool_mask(mask: Tensor | None, like: Tensor) -> Tensor:
    return torch.ones_like(like, dtype=torch.bool) if mask is None else mask.to(torch.bool)


def _zeroed(x: Tensor, mask: Tensor) -> Tensor:
    """x in float32+ with masked-out positions set to 0 (so padding holding -inf/NaN cannot poison gradients)."""
    x = f32(x)
    return torch.where(mask, x, torch.zeros_like(x))


def log_ratio(token_logps: Tensor, old_token_logps: Tensor | None, mask: Tensor | None = None,
              level: str = "token") -> Tensor:
    """log r = log π_θ(y_t) - log π_old(y_t), [B, T] (``level="token"``, PPO/GRPO), or GSPO's length-normalised
    sequence log-ratio (1/|y|)·Σ_t m_t·log r_t, [B, 1] (``level="sequence"``; TRL ``importance_sampling_level``).
    ``old_token_logps=None`` uses sg(token_logps). Masked positions give 0."""
    require(token_logps=token_logps)
    m = _bool_mask(mask, token_logps)
    lp = _zeroed(token_logps, m)
    old = lp.detach() if old_token_logps is None else _zeroed(old_token_logps, m).detach()
    lr = lp - old
    if level == "token":
        return lr
    if level == "sequence":
        return (lr.sum(-1) / m.sum(-1).clamp(min=1)).unsqueeze(-1)
    raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {level!r}")


def clipped_surrogate(ratio: Tensor, advantages: Tensor, epsilon: float = 0.2, epsilon_high: float | None = None,
                      delta: float | None = None) -> Tensor:
    """PPO's clipped surrogate, per token: -min(r̃·A, clip(r, 1-ε, 1+ε_high)·A) with r̃ = min(r, δ) when
    ``delta`` is set (INTELLECT-2's two-sided clipping: also bounds the ratio of negative-advantage tokens),
    else r̃ = r. ``epsilon_high=None`` means ε (symmetric clip; DAPO's "clip-higher" uses 0.28)."""
    eps_high = epsilon if epsilon_high is None else epsilon_high
    clipped = ratio.clamp(1.0 - epsilon, 1.0 + eps_high)
    if delta is not None:
        ratio = ratio.clamp(max=delta)
    return -torch.minimum(ratio * advantages, clipped * advantages)


def sampler_importance_ratio(old_token_logps: Tensor, sampler_token_logps: Tensor, mask: Tensor | None = None,
                             mode: str = "token_truncate", clip_min: float | None = None,
                             clip_max: float | None = 3.0) -> Tensor:
    """Importance weight π_old/π_sampler for completions sampled by another engine, detached.

    ρ = exp(Σ m·(log π_old - log π_sampler)) per token ([B, T], ``token_*``) or per sequence ([B, 1],
    ``sequence_*``); ``*_truncate`` clamps ρ to [clip_min, clip_max] (truncated IS, "TIS"), ``*_mask`` zeroes the
    weights outside that range (masked IS). NaN sampler log-probs (unscored tokens) count as ρ = 1. Defaults:
    token-level truncation at 3 (TRL's ``vllm_importance_sampling_mode`` defaults to ``sequence_mask``; its
    ``vllm_importance_sampling_clip_min`` / ``_max`` are ``clip_min`` / ``clip_max`` here).
    """
    if mode not in IMPORTANCE_SAMPLING_MODES:
        raise ValueError(f"importance sampling mode must be one of {IMPORTANCE_SAMPLING_MODES}, got {mode!r}")
    m = _bool_mask(mask, old_token_logps)
    diff = torch.nan_to_num(_zeroed(old_token_logps, m) - _zeroed(sampler_token_logps, m), nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = clamped_exp(diff.detach())
    if mode.endswith("truncate"):
        return ratio.clamp(min=clip_min, max=clip_max)
    lo = -float("inf") if clip_min is None else clip_min
    hi = float("inf") if clip_max is None else clip_max
    return ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)


def kl_penalty(token_logps: Tensor, ref_token_logps: Tensor | None = None, token_kl: Tensor | None = None,
               estimator: str = "k3") -> Tensor:
    """Per-token KL(π_θ ‖ π_ref) penalty [B, T].

    ``token_kl`` given: the exact full-vocabulary KL Σ_v π_θ(v)(log π_θ(v) - log π_ref(v)) at each position
    (fastpref's option: no sampling noise, gradient through every logit). Otherwise a Schulman estimator on the
    sampled token, ρ = log π_θ(y_t) - log π_ref(y_t): k3 = e^{-ρ} + ρ - 1 (GRPO, DeepSeekMath; TRL's
    ``per_token_kl``), k1 = ρ (PPO-RLHF papers put k1 in the reward: InstructGPT, Safe-RLHF, MaxMin-RLHF) or
    k2 = ρ²/2. Each *estimates* KL(π_θ ‖ π_ref) on samples from π_θ, but the gradient of the penalty as a loss
    term depends on the estimator and on the ratio factor (``KL_GRADIENTS``): the reverse-KL gradient for k1 and
    k3 times r (``use_bias_correction_kl``, the losses' default) and for k2 alone; k2 times r is biased; k3 alone
    gives the forward KL(π_ref ‖ π_θ) gradient, k1 alone none.
    """
    if token_kl is not None:
        return f32(token_kl)
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {sorted(KL_ESTIMATORS)}, got {estimator!r}")
    require(ref_token_logps=ref_token_logps)
    return KL_ESTIMATORS[estimator](logps=token_logps, ref_logps=ref_token_logps)


def normalise(per_token_loss: Tensor, mask: Tensor | None, loss_type: str = "dapo",
              max_completion_length: int | None = None, num_items_in_batch: Tensor | float | None = None) -> Tensor:
    """Per-sequence shares [B] of the batch loss, so that ``.mean()`` is TRL's ``loss_type`` aggregation:

    * ``grpo``:    (1/B)·Σ_i (1/|y_i|)·Σ_t ℓ_{i,t}                      (DeepSeekMath; length-biased)
    * ``bnpo``:    Σ_{i,t} ℓ_{i,t} / Σ_i |y_i|                           (token mean over the local batch)
    * ``dr_grpo``: Σ_{i,t} ℓ_{i,t} / (B · L_max), L_max = ``max_completion_length`` (default T)  (Dr. GRPO)
    * ``dapo``:    Σ_{i,t} ℓ_{i,t} / N, N = ``num_items_in_batch`` (completion tokens in the global generation
      batch; default Σ_i |y_i|, i.e. ``bnpo``)                          (DAPO)

    ``per_token_loss`` [B, T] or [B, 1] (sequence-level, broadcast over the mask).
    """
    m = _bool_mask(mask, per_token_loss).expand(per_token_loss.shape[0], -1)
    loss = per_token_loss.expand_as(m) if per_token_loss.shape[-1] == 1 else per_token_loss
    sums = torch.where(m, loss, torch.zeros_like(loss)).sum(-1)
    B = sums.shape[0]
    if loss_type == "grpo":
        return sums / m.sum(-1).clamp(min=1)
    if loss_type == "bnpo":
        return sums * B / m.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return sums / float(m.shape[-1] if max_completion_length is None else max_completion_length)
    if loss_type == "dapo":
        n = m.sum() if num_items_in_batch is None else f32(num_items_in_batch).to(sums.device)
        return sums * B / n.clamp(min=1)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def entropy_bonus(entropies: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-sequence shares [B] of the batch token-mean entropy Σ_{i,t} m·H / Σ m (gradient through H)."""
    return normalise(entropies, mask, "bnpo")


def _masked_kl(token_logps: Tensor, ref_token_logps: Tensor | None, token_kl: Tensor | None, mask: Tensor,
               estimator: str, ratio: Tensor, use_bias_correction_kl: bool) -> Tensor:
    """:func:`kl_penalty` [B, T] on inputs with masked positions zeroed (``mask`` bool [B, T]), times the ratio r
    ([B, T] or [B, 1]) for a sampled estimator with ``use_bias_correction_kl``."""
    ref, exact = (None if x is None else _zeroed(x, mask) for x in (ref_token_logps, token_kl))
    kl = kl_penalty(_zeroed(token_logps, mask), ref, exact, estimator)
    return kl * ratio if use_bias_correction_kl and token_kl is None else kl


def _objective(surrogate: Tensor, ratio: Tensor, token_logps: Tensor, mask: Tensor | None,
               importance_sampling_ratio: Tensor | None, ref_token_logps: Tensor | None, token_kl: Tensor | None,
               entropies: Tensor | None, beta: float, kl_estimator: str, use_bias_correction_kl: bool,
               entropy_coef: float, loss_type: str, max_completion_length: int | None,
               num_items_in_batch) -> Tensor:
    """ℓ = w·ψ + β·KL (KL·r with ``use_bias_correction_kl``, sampled estimators only), normalised, − c_H·H."""
    mask = _bool_mask(mask, token_logps)  # [B, T] even when ψ is per sequence (GSPO): token counts normalise
    per_token = surrogate
    if importance_sampling_ratio is not None:
        per_token = per_token * f32(importance_sampling_ratio).detach()
    if beta != 0.0:
        per_token = per_token + beta * _masked_kl(token_logps, ref_token_logps, token_kl, mask, kl_estimator,
                                                  ratio, use_bias_correction_kl)
    per_seq = normalise(per_token, mask, loss_type, max_completion_length, num_items_in_batch)
    if entropy_coef != 0.0:
        require(entropies=entropies)
        per_seq = per_seq - entropy_coef * entropy_bonus(_zeroed(entropies, mask), mask)
    return per_seq


def _advantages(advantages: Tensor, like: Tensor) -> Tensor:
    require(advantages=advantages)
    a = f32(advantages).detach()
    if a.dim() == 1:
        a = a.unsqueeze(-1)
    if a.dim() != 2 or a.shape[0] != like.shape[0] or a.shape[1] not in (1, like.shape[1]):
        raise ValueError(f"advantages must be [B]=[{like.shape[0]}] or [B, T]={list(like.shape)}, "
                         f"got {list(advantages.shape)}")
    return a


def _ppo_clip(level: str, *, token_logps: Tensor, advantages: Tensor, old_token_logps: Tensor | None,
              mask: Tensor | None, epsilon: float, epsilon_high: float | None, delta: float | None,
              **terms) -> Tensor:
    """:func:`clipped_surrogate` on the token (PPO / GRPO) or sequence (GSPO) ratio, then :func:`_objective` with
    ``terms``, the loss's remaining arguments by name."""
    require(token_logps=token_logps)
    log_r = log_ratio(token_logps, old_token_logps, mask, level)
    ratio = clamped_exp(log_r)
    adv = _advantages(advantages, token_logps)
    pg_ratio = ratio
    if level == "sequence" and adv.shape[1] > 1:  # GSPO-token: s_{i,t} = sg(s_i)·π_θ(y_t)/sg(π_θ(y_t))
        lp = _zeroed(token_logps, _bool_mask(mask, token_logps))
        pg_ratio = clamped_exp(log_r.detach() + lp - lp.detach())
    surrogate = clipped_surrogate(pg_ratio, adv, epsilon, epsilon_high, delta)
    return _objective(surrogate, ratio, token_logps, mask, **terms)


_COMMON = """
    Inputs and the terms ``importance_sampling_ratio``, β·KL (``beta``, ``kl_estimator``, ``ref_token_logps`` or
    exact ``token_kl``, ``use_bias_correction_kl``: multiply a sampled KL by the ratio r, DeepSeek-V3.2, TRL's
    default) and the entropy bonus (``entropy_coef``, ``entropies``): see the module docstring; ``loss_type``,
    ``max_completion_length``, ``num_items_in_batch``: :func:`normalise`. Returns [B].
    """


@register("grpo", "ppo_clip")
def grpo(
    *, token_logps: Tensor = None, advantages: Tensor = None, old_token_logps: Tensor | None = None,
    mask: Tensor | None = None, importance_sampling_ratio: Tensor | None = None,
    ref_token_logps: Tensor | None = None, token_kl: Tensor | None = None, entropies: Tensor | None = None,
    epsilon: float = 0.2, epsilon_high: float | None = None, delta: float | None = None, beta: float = 0.0,
    kl_estimator: str = "k3", use_bias_correction_kl: bool = True, entropy_coef: float = 0.0,
    loss_type: str = "dapo", max_completion_length: int | None = None, num_items_in_batch=None,
) -> Tensor:
    """PPO-clip / GRPO (Schulman+17; Shao+24), token-level ratio r_t = π_θ(y_t)/π_old(y_t):
    ψ_t = -min(r̃_t·A_t, clip(r_t, 1-ε, 1+ε_high)·A_t), r̃ = min(r, δ) when ``delta`` is set.

    Defaults are TRL's ``GRPOConfig``: ε = 0.2, ε_high = ε, β = 0 (DeepSeekMath used β = 0.04 with k3),
    ``loss_type="dapo"``. PPO-RLHF normalises like ``bnpo``.
    """
    return _ppo_clip("token", **locals())  # every argument, by name


@register("gspo")
def gspo(
    *, token_logps: Tensor = None, advantages: Tensor = None, old_token_logps: Tensor | None = None,
    mask: Tensor | None = None, importance_sampling_ratio: Tensor | None = None,
    ref_token_logps: Tensor | None = None, token_kl: Tensor | None = None, entropies: Tensor | None = None,
    epsilon: float = 3e-4, epsilon_high: float | None = 4e-4, delta: float | None = None, beta: float = 0.0,
    kl_estimator: str = "k3",
    use_bias_correction_kl: bool = True, entropy_coef: float = 0.0, loss_type: str = "grpo",
    max_completion_length: int | None = None, num_items_in_batch=None,
) -> Tensor:
    """GSPO (Zheng+25): sequence-level ratio s_i = exp((1/|y_i|)·Σ_t log(π_θ(y_t)/π_old(y_t))) (gradient through
    every token), ψ_i = -min(s_i·A_i, clip(s_i, 1-ε, 1+ε_high)·A_i) for every token of sequence i.
    Per-token advantages A [B, T] give the paper's GSPO-token (verl's ``gspo``): s_{i,t} = sg(s_i)·π_θ(y_t)/
    sg(π_θ(y_t)), ψ_{i,t} = -min(s_{i,t}·A_{i,t}, clip(s_{i,t}, 1-ε, 1+ε_high)·A_{i,t}) (the value s_i, the
    gradient through token t only); with A [B] both forms have the same value and gradient.

    Defaults are the paper's (and TRL's GSPO recipe: ``importance_sampling_level="sequence"``): ε = 3e-4,
    ε_high = 4e-4, β = 0, ``loss_type="grpo"`` (a per-sequence mean, i.e. the paper's (1/G)·Σ_i ψ_i); ``delta``
    caps s_i as in :func:`grpo`.
    """
    return _ppo_clip("sequence", **locals())  # every argument, by name


@register("cispo")
def cispo(
    *, token_logps: Tensor = None, advantages: Tensor = None, old_token_logps: Tensor | None = None,
    mask: Tensor | None = None, importance_sampling_ratio: Tensor | None = None,
    ref_token_logps: Tensor | None = None, token_kl: Tensor | None = None, entropies: Tensor | None = None,
    epsilon_high: float = 5.0, beta: float = 0.0, kl_estimator: str = "k3", use_bias_correction_kl: bool = True,
    entropy_coef: float = 0.0, loss_type: str = "dapo", max_completion_length: int | None = None,
    num_items_in_batch=None,
) -> Tensor:
    """CISPO (MiniMax-M1, Chen+25): clip the importance weight, not the update, and keep every token's gradient:
    ψ_t = -sg(min(r_t, ε_max))·A_t·log π_θ(y_t), r_t = π_θ(y_t)/π_old(y_t).

    ε_max = ``epsilon_high`` (TRL's name; ScaleRL recommends 5.0, the default here: TRL's own default would be
    its ``epsilon``), ``loss_type="dapo"`` (token mean over the batch, as TRL).
    """
    require(token_logps=token_logps)
    m = _bool_mask(mask, token_logps)
    lr = log_ratio(token_logps, old_token_logps, mask)
    ratio = clamped_exp(lr)
    weight = ratio.clamp(max=epsilon_high).detach()
    surrogate = -weight * _advantages(advantages, lr) * _zeroed(token_logps, m)
    return _objective(surrogate, ratio, token_logps, mask, importance_sampling_ratio, ref_token_logps, token_kl,
                      entropies, beta, kl_estimator, use_bias_correction_kl, entropy_coef, loss_type,
                      max_completion_length, num_items_in_batch)


for _fn in (grpo, gspo, cispo):
    _fn.__doc__ += _COMMON


@torch.no_grad()
def policy_metrics(token_logps: Tensor, advantages: Tensor, old_token_logps: Tensor | None = None,
                   mask: Tensor | None = None, *, loss: str = "grpo", epsilon: float | None = None,
                   epsilon_high: float | None = None, delta: float | None = None, entropies: Tensor | None = None,
                   ref_token_logps: Tensor | None = None, token_kl: Tensor | None = None, kl_estimator: str = "k3",
                   use_bias_correction_kl: bool = True) -> dict[str, float]:
    """The diagnostics TRL's ``GRPOTrainer`` logs, under its names (one device): ``entropy`` and ``kl`` (token means
    over the batch; ``kl`` only with ``ref_token_logps`` / ``token_kl``), and for ``loss`` grpo / ppo_clip / gspo
    the clipped fractions ``clip_ratio/low_mean`` (r < 1-ε, A < 0), ``clip_ratio/high_mean`` (r > 1+ε_high, A > 0),
    ``clip_ratio/region_mean`` (either), ``clip_ratio/low_min`` / ``clip_ratio/high_max`` (min / max over sequences
    of the per-sequence fraction); for cispo ``cispo_clip_ratio`` (r > ε_max, A > 0). ε / ε_high default to the
    named loss's defaults. With ``delta`` the clip fractions are, as
    in TRL, those of the δ-capped ratio min(r, δ); ``kl`` is measured on the uncapped one."""
    defaults = {k: p.default for k, p in inspect.signature(get(loss)).parameters.items()}
    epsilon = defaults.get("epsilon") if epsilon is None else epsilon
    epsilon_high = defaults.get("epsilon_high") if epsilon_high is None else epsilon_high
    m = _bool_mask(mask, token_logps)
    level = "sequence" if loss == "gspo" else "token"
    ratio = clamped_exp(log_ratio(token_logps, old_token_logps, m, level))
    a = _advantages(advantages, token_logps)
    count = m.sum().clamp(min=1)

    def token_mean(x: Tensor) -> float:
        if x.shape[-1] == 1:  # one value per sequence (GSPO): a mean over sequences, as TRL
            return float(x.float().mean())
        return float(torch.where(m, f32(x), 0.0).sum() / count)

    def seq_means(x: Tensor) -> Tensor:
        return x.float().squeeze(-1) if x.shape[-1] == 1 else torch.where(m, x.float(), 0.0).sum(-1) / m.sum(-1)

    out: dict[str, float] = {}
    if ref_token_logps is not None or token_kl is not None:
        out["kl"] = token_mean(_masked_kl(token_logps, ref_token_logps, token_kl, m, kl_estimator, ratio,
                                          use_bias_correction_kl))
    if entropies is not None:
        out["entropy"] = token_mean(_zeroed(entropies, m))
    eps_high = epsilon if epsilon_high is None else epsilon_high
    if loss == "cispo":
        out["cispo_clip_ratio"] = token_mean((ratio > eps_high) & (a > 0))
        return out
    if delta is not None:
        ratio = ratio.clamp(max=delta)
    low, high = (ratio < 1 - epsilon) & (a < 0), (ratio > 1 + eps_high) & (a > 0)
    out.update({"clip_ratio/low_mean": token_mean(low), "clip_ratio/high_mean": token_mean(high),
                "clip_ratio/region_mean": token_mean(low | high),
                "clip_ratio/low_min": float(seq_means(low).nan_to_num(float("inf")).min()),
                "clip_ratio/high_max": float(seq_means(high).nan_to_num(-float("inf")).max())})
    return out
