"""Flattening to compact rows and scattering results back, shared by the public ops."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Rows:
    """The rows a backend computes: hidden [..., D] flattened to [N, D], minus ignored rows."""

    shape: tuple[int, ...]  # leading shape of the outputs
    index: torch.Tensor | None  # kept rows of the flattened [N] layout; None = all

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """[..., *] → the kept rows [M, *], contiguous (differentiable)."""
        flat = x.reshape(self.numel, *x.shape[len(self.shape):])
        if self.index is not None:
            flat = flat.index_select(0, self.index)
        return flat.contiguous()

    def put(self, out: torch.Tensor | None) -> torch.Tensor | None:
        """Float32 [M] → shaped like the labels, 0 at ignored rows (differentiable)."""
        if out is None:
            return None
        if self.index is not None:
            out = torch.zeros(self.numel, device=out.device, dtype=out.dtype).index_copy(0, self.index, out)
        return out.reshape(self.shape)


def float32_or_none(g: torch.Tensor | None) -> torch.Tensor | None:
    return None if g is None else g.float().contiguous()


def cast_grads(grads, like) -> tuple:
    """Cast each gradient to the dtype of the matching input (None stays None)."""
    return tuple(None if g is None else g.to(x.dtype) for g, x in zip(grads, like))


def empty_grads(needs, like) -> tuple:
    return tuple(torch.zeros_like(x) if (n and x is not None) else None for n, x in zip(needs, like))
