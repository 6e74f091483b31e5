"""Flattening to the rows a backend computes, and scattering results back, shared by the public ops."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import valid_rows


@dataclass
class Rows:
    """The rows a backend computes: hidden [..., D] flattened to [N, D].

    Eagerly, ignored rows are removed (``index`` holds the kept ones; None = all), so they cost nothing.
    Under torch.compile (no data-dependent shapes) every row is computed and ignored ones are masked
    (``keep``), with their labels replaced by 0.
    """

    shape: tuple[int, ...]  # leading shape of the outputs
    index: torch.Tensor | None = None
    keep: torch.Tensor | None = None

    @classmethod
    def for_labels(cls, labels: torch.Tensor | None, shape: tuple[int, ...], vocab: int | None,
                   ignore_index: int) -> "Rows":
        if labels is None:
            return cls(shape)
        if torch.compiler.is_compiling():
            return cls(shape, keep=labels.reshape(-1) != ignore_index)
        return cls(shape, index=valid_rows(labels, vocab, ignore_index))

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """[..., *] → the computed rows [M, *], contiguous (differentiable)."""
        flat = x.reshape(self.numel, *x.shape[len(self.shape):])
        if self.index is not None:
            flat = flat.index_select(0, self.index)
        return flat.contiguous()

    def take_labels(self, labels: torch.Tensor) -> torch.Tensor:
        lab = self.take(labels).long()
        return lab if self.keep is None else torch.where(self.keep, lab, torch.zeros_like(lab))

    def put(self, out: torch.Tensor) -> torch.Tensor:
        """Float32 [M] → shaped like the labels, 0 at ignored rows (differentiable)."""
        if self.index is not None:
            out = torch.zeros(self.numel, device=out.device, dtype=out.dtype).index_copy(0, self.index, out)
        elif self.keep is not None:
            out = torch.where(self.keep, out, torch.zeros_like(out))
        return out.reshape(self.shape)
