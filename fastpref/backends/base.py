"""The interface every backend implements."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from ..options import LogitOptions

Tensor = torch.Tensor


class BackendUnavailable(RuntimeError):
    """Raised while loading a backend that cannot work in this installation (the message says why)."""


@runtime_checkable
class Backend(Protocol):
    name: str

    def supports(self, device: torch.device, dtype: torch.dtype | None = None) -> str | None:
        """None when tensors of this device/dtype can be handled, else the reason why not."""

    def stats_forward(
        self, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
        opts: LogitOptions, entropy: bool, log_sum_p2: bool,
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """(logp, lse, entropy or None, log_sum_p2 or None), each float32 [M]."""

    def stats_forward_frozen(
        self, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
        opts: LogitOptions, entropy: bool, log_sum_p2: bool,
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor, Tensor | None]:
        """stats_forward plus, for a frozen head, EA = E_p[(dz/dx)·W] and (with entropy)
        EC = E_p[(log p + H)·(dz/dx)·W], float32 [M, D] (see fastpref._frozen)."""

    def stats_backward(
        self, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
        lse: Tensor, entropy: Tensor | None,
        grad_logp: Tensor | None, grad_lse: Tensor | None, grad_entropy: Tensor | None,
        opts: LogitOptions, needs: tuple[bool, bool, bool],
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """Gradients (hidden, weight, bias), each None when not needed; float32 or the input dtype.

        grad_* are float32 [M] or None (zero). With z the logits, p = softmax(z) and H the entropy:
        dL/dz_v = g_logp·[v = y] + p_v·(g_lse − g_logp − g_entropy·(log p_v + H)).
        """

    def kl_forward(
        self, hidden: Tensor, weight: Tensor, bias: Tensor | None,
        ref_hidden: Tensor, ref_weight: Tensor, ref_bias: Tensor | None,
        labels: Tensor | None, opts: LogitOptions, ref_opts: LogitOptions, direction: str,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
        """(kl, lse, ref_lse, logp or None, ref_logp or None), each float32 [M]."""

    def kl_forward_frozen(
        self, hidden: Tensor, weight: Tensor, bias: Tensor | None,
        ref_hidden: Tensor, ref_weight: Tensor, ref_bias: Tensor | None,
        labels: Tensor | None, opts: LogitOptions, ref_opts: LogitOptions, direction: str,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor, Tensor | None]:
        """kl_forward plus, for a frozen policy head, dKL = ∂KL/∂hidden and (with labels) EA = E_p[(dz/dx)·W],
        float32 [M, D] (see fastpref._frozen)."""

    def kl_backward(
        self, hidden: Tensor, weight: Tensor, bias: Tensor | None,
        ref_hidden: Tensor, ref_weight: Tensor, ref_bias: Tensor | None,
        labels: Tensor | None, lse: Tensor, ref_lse: Tensor, kl: Tensor,
        grad_kl: Tensor | None, grad_logp: Tensor | None,
        opts: LogitOptions, ref_opts: LogitOptions, direction: str, needs: tuple[bool, bool, bool],
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """Gradients of the policy side (hidden, weight, bias); the reference side is constant.

        forward  KL(ref‖θ): dKL/dz_v = p_v − q_v;   reverse KL(θ‖ref): dKL/dz_v = p_v·(log p_v − log q_v − KL),
        with p the policy's and q the reference's softmax; plus g_logp·([v = y] − p_v).
        """
