"""Sequence reductions from per-token log-probs (pure torch, no python loops over sequences).

All sums are accumulated in float32 (or wider): bf16 summed log-probs lose whole nats at |ℓ| ~ 500.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._math import f32


def _masked(token_logps: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    lp = f32(token_logps)
    if mask is None:
        return lp, torch.ones_like(lp, dtype=torch.bool)
    m = mask.to(torch.bool)
    return torch.where(m, lp, torch.zeros_like(lp)), m


def masked_sums(token_logps: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Padded batch -> per-sequence (sums [B] float32, token counts [B] int64).

    ``token_logps`` [B, T] per-token target log-probs; ``mask`` [B, T] (bool/int, 1 = completion token).
    Masked-out positions are ignored even if they are not zero (or are NaN/inf).
    """
    lp, m = _masked(token_logps, mask)
    return lp.sum(-1), m.sum(-1)


def packed_sums(token_logps: Tensor, cu_seqlens: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Packed (padding-free) batch -> per-sequence (sums [S] float32, token counts [S] int64).

    ``token_logps`` [N] (or [1, N]) for S sequences concatenated; ``cu_seqlens`` int [S+1] cumulative
    boundaries (flash-attn convention, cu_seqlens[0] = 0); ``mask`` [N] optional (e.g. 0 on prompt tokens).
    Tokens at positions >= cu_seqlens[-1] (trailing pad) are ignored. Segment sums via index_add.
    """
    lp, m = _masked(token_logps.reshape(-1), None if mask is None else mask.reshape(-1))
    cu = cu_seqlens.to(device=lp.device, dtype=torch.int64)
    n_seq = cu.numel() - 1
    if n_seq < 0:
        raise ValueError("cu_seqlens must have at least one entry")
    pos = torch.arange(lp.numel(), device=lp.device)
    seg = torch.searchsorted(cu[1:], pos, right=True)  # sequence id of each token; n_seq past the end
    valid = m & (seg < n_seq)
    seg = seg.clamp(max=max(n_seq - 1, 0))
    sums = torch.zeros(n_seq, dtype=lp.dtype, device=lp.device).index_add_(0, seg, torch.where(valid, lp, 0.0))
    counts = torch.zeros(n_seq, dtype=torch.int64, device=lp.device).index_add_(0, seg, valid.to(torch.int64))
    return sums, counts


def ld_dpo_shared_lengths(chosen_mask: Tensor, rejected_mask: Tensor) -> Tensor:
    """LD-DPO's shared length s = min(|y_w|, |y_l|) per pair, from [B, T] completion masks. int64 [B]."""
    return torch.minimum(chosen_mask.to(torch.int64).sum(-1), rejected_mask.to(torch.int64).sum(-1))


def ld_dpo_partial_sums(token_logps: Tensor, mask: Tensor, shared_lengths: Tensor) -> tuple[Tensor, Tensor]:
    """LD-DPO split of a padded batch: (sum over the first s completion tokens, sum over the rest), [B] each.

    ``token_logps`` / ``mask`` [B, T]; ``shared_lengths`` s [B] (see :func:`ld_dpo_shared_lengths`). Completion
    tokens are counted in mask order, so a prompt prefix masked out is skipped (as in TRL).
    """
    lp, m = _masked(token_logps, mask)
    comp_pos = m.to(torch.int64).cumsum(-1)
    shared = m & (comp_pos <= shared_lengths.to(torch.int64).unsqueeze(-1))
    zero = torch.zeros_like(lp)
    return torch.where(shared, lp, zero).sum(-1), torch.where(m & ~shared, lp, zero).sum(-1)
