"""Unpaired (binary-feedback) losses: KTO, APO-zero-unpaired, BCO.

Inputs (keyword-only): ``logps`` / ``ref_logps`` [B] summed completion log-probs of policy / reference,
``desirable`` [B] bool (True = desirable; named like ``PreferenceLoss.forward``'s argument). h = ℓ_θ - ℓ_ref. Returns the unreduced loss [B] **in input order**
(TRL concatenates [desirable..., undesirable...]; the mean is the same).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._math import f32, logsigmoid, require
from .registry import register


def _unpaired(logps, ref_logps, desirable) -> tuple[Tensor, Tensor]:
    require(logps=logps, ref_logps=ref_logps, desirable=desirable)
    return f32(logps) - f32(ref_logps), desirable.to(torch.bool)


def kto_mismatched_index(batch_size: int) -> Tensor:
    """Index of the completion paired with prompt i for KTO's KL estimate: (i - 1) mod B, as TRL builds
    ``KL_completion_ids`` (completions cycled by one within the batch). int64 [B]."""
    return torch.roll(torch.arange(batch_size), 1)


def kto_reference_point(kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """z0 = max(0, mean_B[ℓ_θ(y'|x) - ℓ_ref(y'|x)]), detached, from the mismatched pairs (x, y').

    Multi-process: all-reduce the mean *before* the clamp (TRL gathers it) and pass the result as ``kl``.
    """
    return (f32(kl_logps) - f32(ref_kl_logps)).mean().detach().clamp(min=0.0)


@register("kto")
def kto(
    *, logps: Tensor = None, ref_logps: Tensor = None, desirable: Tensor = None,
    kl: Tensor | float | None = None, kl_logps: Tensor | None = None, ref_kl_logps: Tensor | None = None,
    beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
) -> Tensor:
    """KTO (Ethayarajh+24, TRL ``KTOTrainer``): desirable λ_D·(1 - σ(β(h - z0))), undesirable λ_U·(1 - σ(β(z0 - h))).

    Reference point z0: either ``kl`` (a precomputed, e.g. cross-rank, batch KL estimate; detached and
    clamped at 0 here), or estimated from ``kl_logps`` / ``ref_kl_logps`` [B'] of mismatched (prompt,
    completion) pairs (see :func:`kto_mismatched_index`, :func:`kto_reference_point`). Pass ``kl=0`` for
    TRL's ``calculate_KL=False``. Batch-coupled through z0. TRL wants λ_D·n_D/(λ_U·n_U) ∈ [1, 4/3].
    """
    h, lab = _unpaired(logps, ref_logps, desirable)
    if kl is None:
        if kl_logps is None or ref_kl_logps is None:
            raise ValueError("kto needs the reference point: pass kl, or kl_logps and ref_kl_logps")
        z0 = kto_reference_point(kl_logps, ref_kl_logps)
    else:
        z0 = f32(kl).detach().clamp(min=0.0)
    des = desirable_weight * torch.sigmoid(-beta * (h - z0))
    und = undesirable_weight * torch.sigmoid(-beta * (z0 - h))
    return torch.where(lab, des, und)


@register("apo_zero_unpaired")
def apo_zero_unpaired(
    *, logps: Tensor = None, ref_logps: Tensor = None, desirable: Tensor = None,
    beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
) -> Tensor:
    """APO-zero, unpaired (TRL ``KTOTrainer`` ``apo_zero_unpaired``): desirable λ_D·(1 - σ(βh)), undesirable λ_U·σ(βh)."""
    h, lab = _unpaired(logps, ref_logps, desirable)
    return torch.where(lab, desirable_weight * torch.sigmoid(-beta * h), undesirable_weight * torch.sigmoid(beta * h))


@register("bco")
def bco(
    *, logps: Tensor = None, ref_logps: Tensor = None, desirable: Tensor = None,
    delta: Tensor | float = 0.0, beta: float = 0.1,
) -> Tensor:
    """BCO (Jung+24, TRL ``BCOTrainer.bco_loss``): desirable -logσ(βh - δ), undesirable -logσ(-(βh - δ)).

    ``delta`` δ: running mean of the implicit rewards βh over past batches, maintained by the caller (TRL
    ``RunningMoments``, updated with the current batch *before* use); detached here. Optional UDM density-ratio
    weights for undesirable samples are applied by the caller by multiplication.
    """
    h, lab = _unpaired(logps, ref_logps, desirable)
    d = f32(delta).detach() if torch.is_tensor(delta) else delta
    x = beta * h - d
    return -logsigmoid(torch.where(lab, x, -x))
