"""Full-vocabulary KL between a policy and a reference model, per token, without either model's logits."""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import backends
from ._checks import check_head, check_labels, valid_rows
from ._rows import Rows, cast_grads, empty_grads, float32_or_none
from .options import LogitOptions

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


class TokenKLFunction(torch.autograd.Function):
    """Autograd wiring of a backend's KL forward and backward; the reference side gets no gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, backend, opts, ref_opts,
                direction):
        ctx.set_materialize_grads(False)
        if hidden.shape[0] == 0:
            kl = hidden.new_zeros(0, dtype=torch.float32)
            lse, ref_lse = kl.clone(), kl.clone()
            logp = kl.clone() if labels is not None else None
            ref_logp = kl.clone() if labels is not None else None
        else:
            kl, lse, ref_lse, logp, ref_logp = backend.kl_forward(
                hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, opts, ref_opts, direction)
        ctx.backend, ctx.opts, ctx.ref_opts, ctx.direction = backend, opts, ref_opts, direction
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lse, ref_lse, kl)
        if ref_logp is not None:
            ctx.mark_non_differentiable(ref_logp)
        return kl, logp, ref_logp

    @staticmethod
    def backward(ctx, grad_kl, grad_logp, _grad_ref_logp):
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lse, ref_lse, kl = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        inputs = (hidden, weight, bias)
        if hidden.shape[0] == 0 or (grad_kl is None and grad_logp is None) or not any(needs):
            grads = empty_grads(needs, inputs)
        else:
            grads = ctx.backend.kl_backward(
                hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lse, ref_lse, kl,
                float32_or_none(grad_kl), float32_or_none(grad_logp), ctx.opts, ctx.ref_opts, ctx.direction,
                tuple(needs),
            )
            grads = cast_grads(grads, inputs)
        return (*grads, None, None, None, None, None, None, None, None)


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
) -> TokenKL:
    """Per-token KL over the whole vocabulary between policy θ and reference, in one streaming pass.

    hidden [..., D] and weight [V, D] (bias [V]) define the policy; ref_hidden [..., D_ref] and
    ref_weight [V, D_ref] (ref_bias [V]) the reference, which may have another hidden size but the same V.
    direction "forward" = KL(π_ref‖π_θ) = Σ_v q_v (log q_v − log p_v) (TDPO's quantity);
    "reverse" = KL(π_θ‖π_ref). temperature applies to both models; softcap / ref_softcap to each.
    labels [...] int (optional): also returns both models' log-probs of the labels; positions equal to
    ignore_index give 0 and no gradient. Without labels every position counts.
    Gradients flow to the policy's hidden, weight and bias only.
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
    impl = backends.resolve(backend, h.device, h.dtype)
    if labels is None:
        lab = None
        rows = Rows(tuple(h.shape[:-1]), None)
    else:
        lab = check_labels(labels, h, ignore_index)
        rows = Rows(tuple(lab.shape), valid_rows(lab, w.shape[0], ignore_index))
    rdetach = rh.detach(), rw.detach(), None if rb is None else rb.detach()
    outs = TokenKLFunction.apply(
        rows.take(h), w.contiguous(), None if b is None else b.contiguous(),
        rows.take(rdetach[0]), rdetach[1].contiguous(), None if rdetach[2] is None else rdetach[2].contiguous(),
        None if lab is None else rows.take(lab).long(), impl, opts, ref_opts, direction,
    )
    return TokenKL(*(rows.put(o) for o in outs))
