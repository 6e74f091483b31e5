"""KTO's reference point for a training micro-batch, as TRL's ``KTOTrainer`` computes it.

z0 = max(0, mean_i[ℓ_θ(y_{i-1} | x_i) - ℓ_ref(y_{i-1} | x_i)]), detached: the KL estimate from mismatched
(prompt, completion) pairs, completions rotated by one within the micro-batch (TRL's ``KL_completion_ids``),
the policy's log-probs under ``no_grad``, the mean taken over all processes before the clamp. (BCO's running
δ lives in ``fastpref.nn.PreferenceLoss``, ``delta="running"``.)
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..losses import kto_mismatched_index
from . import data as D
from .dist import Dist
from .objective import call


def mismatched_pairs(ds: D.Dataset, index: list[int], max_length: int) -> list[tuple[list[int], list[int]]]:
    """(prompt of example index[i], completion of example index[i-1]) for every i, the completion cut to fit
    ``max_length``."""
    seqs = D.sequences(ds, index)
    other = kto_mismatched_index(len(seqs)).tolist()
    out = []
    for i, j in enumerate(other):
        p, c = seqs[i][0], seqs[j][1]
        out.append((p, c[: max(1, max_length - len(p))]))
    return out


@torch.no_grad()
def kto_kl(policy: nn.Module, reference: nn.Module, ds: D.Dataset, index: list[int], *, max_length: int,
           d: Dist, device, autocast, **collate_kw) -> Tensor:
    """The unclamped, process-averaged KL estimate mean(ℓ_θ - ℓ_ref) over this micro-batch's mismatched
    pairs (a float32 scalar; ``fastpref.losses.kto`` detaches and clamps it at 0)."""
    b = D.collate(mismatched_pairs(ds, index, max_length), **collate_kw).to(device)
    with autocast():
        pol = call(policy, b, mode="logps")["logps"].float()
        ref = call(reference, b, mode="logps")["logps"].float()
    kl = (pol - ref).mean().reshape(1)
    return (d.sum_(kl) / d.world)[0]
