"""Sampled-token KL(π_θ ‖ π_ref) estimators (Schulman's k1/k2/k3), per token.

Inputs: ``logps`` / ``ref_logps`` [..., T] target-token log-probs of tokens sampled from π_θ;
ρ_t = log π_θ(y_t) - log π_ref(y_t). Output: per-token estimate [..., T] (mask/reduce with
:mod:`fastpref.losses.reduce`). The *exact* full-vocabulary per-token KL is computed by ``fastpref.token_kl``
(a fused kernel), not here.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._math import EXP_CLAMP, f32, require
from .registry import register


def _rho(logps: Tensor | None, ref_logps: Tensor | None) -> Tensor:
    require(logps=logps, ref_logps=ref_logps)
    return f32(logps) - f32(ref_logps)


@register("k1")
def k1(*, logps: Tensor = None, ref_logps: Tensor = None) -> Tensor:
    """k1 = ρ (unbiased, high variance, can be negative; PPO's per-token KL penalty)."""
    return _rho(logps, ref_logps)


@register("k2")
def k2(*, logps: Tensor = None, ref_logps: Tensor = None) -> Tensor:
    """k2 = ½ρ² (biased, low variance, >= 0)."""
    return 0.5 * _rho(logps, ref_logps) ** 2


@register("k3")
def k3(*, logps: Tensor = None, ref_logps: Tensor = None) -> Tensor:
    """k3 = exp(-ρ) + ρ - 1 (unbiased, >= 0; GRPO), as expm1(-ρ) + ρ with the exponent clamped at 80."""
    rho = _rho(logps, ref_logps)
    return torch.expm1(torch.clamp(-rho, max=EXP_CLAMP)) + rho
