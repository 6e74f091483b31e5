"""The primitive: per-token log-prob, log-sum-exp, entropy and log Σp² of softmax(cap(h·Wᵀ + b)/T)."""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import backends
from ._checks import check_head, check_labels, valid_rows
from ._rows import Rows, cast_grads, empty_grads, float32_or_none
from .options import LogitOptions

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


class TokenStatsFunction(torch.autograd.Function):
    """Autograd wiring of one backend's forward and backward on compact rows."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, backend, opts, want_entropy, want_log_sum_p2):
        ctx.set_materialize_grads(False)
        if hidden.shape[0] == 0:
            empty = hidden.new_zeros(0, dtype=torch.float32)
            logp, lse = empty, empty.clone()
            ent = empty.clone() if want_entropy else None
            p2 = empty.clone() if want_log_sum_p2 else None
        else:
            logp, lse, ent, p2 = backend.stats_forward(hidden, weight, bias, labels, opts, want_entropy,
                                                       want_log_sum_p2)
        ctx.backend, ctx.opts = backend, opts
        ctx.save_for_backward(hidden, weight, bias, labels, lse, ent)
        if p2 is not None:
            ctx.mark_non_differentiable(p2)
        return logp, lse, ent, p2

    @staticmethod
    def backward(ctx, grad_logp, grad_lse, grad_entropy, _grad_p2):
        hidden, weight, bias, labels, lse, ent = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        inputs = (hidden, weight, bias)
        nothing = grad_logp is None and grad_lse is None and grad_entropy is None
        if hidden.shape[0] == 0 or nothing or not any(needs):
            grads = empty_grads(needs, inputs)
        else:
            grads = ctx.backend.stats_backward(
                hidden, weight, bias, labels, lse, ent, float32_or_none(grad_logp), float32_or_none(grad_lse),
                float32_or_none(grad_entropy) if ent is not None else None, ctx.opts, tuple(needs),
            )
            grads = cast_grads(grads, inputs)
        return (*grads, None, None, None, None, None)


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
) -> TokenStats:
    """Per-token statistics of softmax(z), z = cap(hidden·weightᵀ + bias)/temperature, without [N, V] logits.

    hidden [..., D] float (any leading shape, views allowed); weight [V, D]; bias [V]; labels [...] int.
    cap(x) = softcap·tanh(x/softcap) when softcap is set. Gradients flow to hidden, weight and bias from
    logp, lse and entropy (any combination), accumulated in float32, returned in the input dtype.
    Positions whose label is ignore_index give 0 and pass no gradient.
    backend: "auto" (triton on CUDA, native or torch on CPU; env FASTPREF_BACKEND overrides), "torch",
    "triton" or "native".
    """
    opts = LogitOptions(temperature, softcap)
    h, w, b = check_head("", hidden, weight, bias)
    lab = check_labels(labels, h, ignore_index)
    if not isinstance(entropy, bool) or not isinstance(log_sum_p2, bool):
        raise TypeError("entropy and log_sum_p2 must be bools")
    impl = backends.resolve(backend, h.device, h.dtype)
    rows = Rows(tuple(lab.shape), valid_rows(lab, w.shape[0], ignore_index))
    outs = TokenStatsFunction.apply(
        rows.take(h), w.contiguous(), None if b is None else b.contiguous(), rows.take(lab).long(),
        impl, opts, entropy, log_sum_p2,
    )
    return TokenStats(*(rows.put(o) for o in outs))


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
) -> Tensor:
    """log p(labels) per token, float32 shaped like labels (0 where ignored). See ``token_stats``."""
    return token_stats(hidden, weight, labels, bias=bias, temperature=temperature, softcap=softcap,
                       ignore_index=ignore_index, backend=backend).logp
