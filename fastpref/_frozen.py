"""Frozen heads: dL/dh without a backward pass over the vocabulary.

When neither the head's weight nor its bias needs a gradient, the forward also accumulates, per row
(float32 [M, D], flash-attention style, rescaled with the online max):
    EA = E_p[(dz/dx)·W]                    (always)
    EC = E_p[(log p + H)·(dz/dx)·W]        (when the entropy is computed)
where dz/dx = 1/T, or (1 − tanh²(x/cap))/T with a softcap: the softcap derivative sits inside the
expectation, so the softcapped case is exact too. With dL/dz_v = g_logp·[v = y] + p_v·(g_lse − g_logp −
g_ent·(log p_v + H)) the hidden-state gradient is then
    dL/dh = g_logp·((dz/dx)_y·W_y − EA) + g_lse·EA − g_ent·EC,
a gather of W[y] and a few [M, D] products: no logits are recomputed in the backward.

token_kl with a frozen policy head (the reference side never needs gradients) keeps, with s = dz/dx of the
policy's transform, p the policy's and q the reference's softmax, d = z − z_ref:
    dKL = ∂KL/∂h = E_p[s·W] − E_q[s·W]            (direction "forward", KL(ref‖θ))
    dKL = ∂KL/∂h = E_p[(d − E_p[d])·s·W]           (direction "reverse", KL(θ‖ref); accumulated centred on
                                                   the running mean of d, so no float32 cancellation)
    EA  = E_p[s·W]                                  (with labels)
and the backward is dL/dh = g_kl·dKL + g_logp·((dz/dx)_y·W_y − EA).
"""
from __future__ import annotations

import torch

from .options import LogitOptions

Tensor = torch.Tensor


def label_slope(logp: Tensor, lse: Tensor, opts: LogitOptions) -> Tensor:
    """(dz/dx) at the label, float32 [M]: 1/T, or (1 − c²)/T with c = tanh(x_y/cap) = z_y·T/cap."""
    if opts.softcap is None:
        return torch.full_like(lse, 1.0 / opts.temperature)
    c = (logp + lse) * (opts.temperature / opts.softcap)
    return (1.0 - c * c) / opts.temperature


def hidden_grad(weight: Tensor, labels: Tensor, logp: Tensor, lse: Tensor, ea: Tensor, ec: Tensor | None,
                grad_logp: Tensor, grad_lse: Tensor, grad_entropy: Tensor | None, opts: LogitOptions) -> Tensor:
    """dL/dh float32 [M, D] from the forward's EA (and EC); grad_* float32 [M] (grad_entropy None: zero)."""
    dh = (grad_logp * label_slope(logp, lse, opts))[:, None] * weight[labels].float()
    dh += (grad_lse - grad_logp)[:, None] * ea
    if grad_entropy is not None:
        if ec is None:
            raise RuntimeError("the entropy's gradient needs E_p[(log p + H)·W] from a forward with entropy=True")
        dh -= grad_entropy[:, None] * ec
    return dh


def kl_hidden_grad(weight: Tensor, labels: Tensor | None, logp: Tensor | None, lse: Tensor, dkl: Tensor,
                   ea: Tensor | None, grad_kl: Tensor, grad_logp: Tensor | None, opts: LogitOptions) -> Tensor:
    """token_kl's dL/dh, float32 [M, D], from the forward's dKL (and EA with labels); grad_* float32 [M]."""
    dh = grad_kl[:, None] * dkl
    if labels is not None and grad_logp is not None:
        dh += (grad_logp * label_slope(logp, lse, opts))[:, None] * weight[labels].float()
        dh -= grad_logp[:, None] * ea
    return dh
