"""The primitive: per-token log-prob, log-sum-exp, entropy and log Σp² of softmax(cap(h·Wᵀ + b)/T)."""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import backends
from ._checks import check_head, check_labels, frozen_head
from ._ops import fused_stats, fused_stats_frozen
from ._rows import Rows
from .options import LogitOptions, use_batch_invariant

Tensor = torch.Tensor


class TokenStats(NamedTuple):
    """Per-token statistics, float32, shaped like labels, 0 at ignored positions.

    logp: log p(label); lse: log Σ_v exp z_v; entropy: −Σ p log p (None unless asked);
    log_sum_p2: log Σ_v p_v² (None unless asked; no gradient).
    """

    logp: Tensor
    lse: Tensor
    entropy: Tensor | None
    log_sum_p2: Tensor | None


def token_stats(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    entropy: bool = False,
    log_sum_p2: bool = False,
    backend: str = "auto",
    sync_free: bool | None = None,
    batch_invariant: bool | None = None,
) -> TokenStats:
    """Per-token statistics of softmax(z), z = cap(hidden·weightᵀ + bias)/temperature, without [N, V] logits.

    hidden [..., D] float (any leading shape, views allowed); weight [V, D]; bias [V]; labels [...] int.
    cap(x) = softcap·tanh(x/softcap) when softcap is set. Gradients flow to hidden, weight and bias from
    logp, lse and entropy (any combination), accumulated in float32, returned in the input dtype. When only
    hidden needs a gradient (a frozen head), the forward also forms E_p[W] (float32 [N, D]; with entropy a
    second one) and the backward makes no pass over the vocabulary (docs/gpu-strategies.md).
    Positions whose label is ignore_index give 0 and pass no gradient.
    backend: "auto" (triton on CUDA, native or torch on CPU; env FASTPREF_BACKEND overrides), "torch",
    "triton" or "native".
    sync_free: mask ignored rows instead of removing them, without host synchronisation (None: env
    FASTPREF_SYNC_FREE; always on under torch.compile and CUDA-graph capture). Out-of-range labels then give
    NaN instead of an error (FASTPREF_CHECK_LABELS=1 raises). See docs/overhead.md.
    batch_invariant: every output row, and its gradient row, bitwise independent of the other rows of the
    call (their number, order, ignore mask); weight / bias gradients independent of the rows' order (None:
    the ``fastpref.batch_invariant`` context manager, else env FASTPREF_BATCH_INVARIANT). Slower; "auto"
    (meaning torch), "torch" and "native" only so far. See docs/batch-invariance.md.
    """
    opts = LogitOptions(temperature, softcap)
    h, w, b = check_head("", hidden, weight, bias)
    lab = check_labels(labels, h, ignore_index)
    if not isinstance(entropy, bool) or not isinstance(log_sum_p2, bool):
        raise TypeError("entropy and log_sum_p2 must be bools")
    name = backends.name_for_op(backend, h.device, h.dtype, use_batch_invariant(batch_invariant))
    rows = Rows.for_labels(lab, tuple(lab.shape), w.shape[0], ignore_index, sync_free)
    # A frozen head (only the hidden states need gradients): the forward also forms E_p[W] so that the
    # backward needs no pass over the vocabulary (fastpref._frozen).
    logp, lse, ent, p2 = (fused_stats_frozen if frozen_head(h, w, b) else fused_stats)(
        rows.take(h), w.contiguous(), None if b is None else b.contiguous(), rows.take_labels(lab),
        name, opts.temperature, opts.softcap, entropy, log_sum_p2,
    )[:4]
    return TokenStats(rows.put(logp), rows.put(lse), rows.put(ent) if entropy else None,
                      rows.put(p2.detach()) if log_sum_p2 else None)


def token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
    sync_free: bool | None = None,
    batch_invariant: bool | None = None,
) -> Tensor:
    """log p(labels) per token, float32 shaped like labels (0 where ignored). See ``token_stats``."""
    return token_stats(hidden, weight, labels, bias=bias, temperature=temperature, softcap=softcap,
                       ignore_index=ignore_index, backend=backend, sync_free=sync_free,
                       batch_invariant=batch_invariant).logp
