"""Full-vocabulary KL between a policy and a reference model, per token, without either model's logits."""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import backends
from ._checks import check_head, check_labels, frozen_head
from ._ops import fused_kl, fused_kl_frozen
from ._rows import Rows
from .options import LogitOptions, use_batch_invariant

Tensor = torch.Tensor
DIRECTIONS = ("forward", "reverse")


class TokenKL(NamedTuple):
    """Per-token results, float32 shaped like labels (or hidden's leading shape), 0 at ignored positions.

    kl: KL(π_ref‖π_θ) for direction="forward", KL(π_θ‖π_ref) for "reverse";
    logp / ref_logp: log-probs of labels under each model (None when labels is None).
    """

    kl: Tensor
    logp: Tensor | None
    ref_logp: Tensor | None


def token_kl(
    hidden: Tensor,
    weight: Tensor,
    ref_hidden: Tensor,
    ref_weight: Tensor,
    labels: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    ref_bias: Tensor | None = None,
    direction: str = "forward",
    temperature: float = 1.0,
    softcap: float | None = None,
    ref_softcap: float | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
    sync_free: bool | None = None,
    batch_invariant: bool | None = None,
) -> TokenKL:
    """Per-token KL over the whole vocabulary between policy θ and reference, in one streaming pass.

    hidden [..., D] and weight [V, D] (bias [V]) define the policy; ref_hidden [..., D_ref] and
    ref_weight [V, D_ref] (ref_bias [V]) the reference, which may have another hidden size but the same V.
    direction "forward" = KL(π_ref‖π_θ) = Σ_v q_v (log q_v − log p_v) (TDPO's quantity);
    "reverse" = KL(π_θ‖π_ref). temperature applies to both models; softcap / ref_softcap to each.
    labels [...] int (optional): also returns both models' log-probs of the labels; positions equal to
    ignore_index give 0 and no gradient. Without labels every position counts.
    Gradients flow to the policy's hidden, weight and bias only. When only the policy's hidden states need a
    gradient (a frozen head), the forward also forms ∂KL/∂hidden (and E_p[W] with labels), float32 [N, D] each,
    and the backward makes no pass over the vocabulary (docs/gpu-strategies.md).
    sync_free: as in ``token_stats`` (ignored rows masked without host synchronisation).
    batch_invariant: as in ``token_stats`` (docs/batch-invariance.md).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    opts = LogitOptions(temperature, softcap)
    ref_opts = LogitOptions(temperature, ref_softcap)
    h, w, b = check_head("", hidden, weight, bias)
    rh, rw, rb = check_head("ref_", ref_hidden, ref_weight, ref_bias)
    if rw.shape[0] != w.shape[0]:
        raise ValueError(f"ref_weight has V={rw.shape[0]} but weight has V={w.shape[0]}; the vocabularies must match")
    if tuple(rh.shape[:-1]) != tuple(h.shape[:-1]):
        raise ValueError(f"ref_hidden must have the leading shape of hidden {tuple(h.shape[:-1])}, "
                         f"got {tuple(rh.shape[:-1])}")
    if rh.device != h.device:
        raise ValueError(f"ref_hidden is on {rh.device} but hidden is on {h.device}")
    name = backends.name_for_op(backend, h.device, h.dtype, use_batch_invariant(batch_invariant))
    if labels is None:
        lab = None
        rows = Rows(tuple(h.shape[:-1]))
    else:
        lab = check_labels(labels, h, ignore_index)
        rows = Rows.for_labels(lab, tuple(lab.shape), w.shape[0], ignore_index, sync_free)
    rdetach = rh.detach(), rw.detach(), None if rb is None else rb.detach()
    # A frozen policy head (only its hidden states need gradients): the forward also forms ∂KL/∂h (and
    # E_p[W] with labels) so that the backward needs no pass over the vocabulary (fastpref._frozen).
    kl, logp, ref_logp = (fused_kl_frozen if frozen_head(h, w, b) else fused_kl)(
        rows.take(h), w.contiguous(), None if b is None else b.contiguous(),
        rows.take(rdetach[0]), rdetach[1].contiguous(), None if rdetach[2] is None else rdetach[2].contiguous(),
        None if lab is None else rows.take_labels(lab), name, opts.temperature, opts.softcap,
        ref_opts.softcap, direction,
    )[:3]
    if lab is None:
        return TokenKL(rows.put(kl), None, None)
    return TokenKL(rows.put(kl), rows.put(logp), rows.put(ref_logp.detach()))
