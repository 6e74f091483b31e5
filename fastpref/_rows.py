"""Flattening to the rows a backend computes, and scattering results back, shared by the public ops.

Two ways to skip the rows whose label is ignore_index:

* compacting (eager default): the kept rows are gathered (``index``), so ignored rows cost nothing; counting
  them and checking the label range synchronises the host with the device once per call;
* masking (``sync_free``): every row is computed, ignored rows get label 0 and their outputs are zeroed
  (``keep``). No host synchronisation and static shapes: always used under torch.compile and while a CUDA graph
  is being captured, chosen with ``sync_free=True`` or the environment variable ``FASTPREF_SYNC_FREE=1``.
  A label outside [0, V) cannot raise there without a synchronisation: its row is computed with label 0 and
  every output of that row is NaN (``bad``). ``FASTPREF_CHECK_LABELS=1`` (a debug switch) raises instead,
  eagerly, at the cost of that synchronisation.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ._checks import check_label_range, label_masks, valid_rows


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes", "on")


def use_sync_free(choice: bool | None, device: torch.device) -> bool:
    """Whether rows are masked instead of compacted: always under torch.compile and CUDA-graph capture;
    else ``choice``, or FASTPREF_SYNC_FREE when ``choice`` is None."""
    if torch.compiler.is_compiling():
        return True
    if choice is not None and not isinstance(choice, bool):
        raise TypeError(f"sync_free must be None or a bool, got {choice!r}")
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return True
    return _env_flag("FASTPREF_SYNC_FREE") if choice is None else choice


@dataclass
class Rows:
    """The rows a backend computes: hidden [..., D] flattened to [N, D] (see the module docstring).

    index: the kept rows when compacting (None = all); keep / bad: flat bool masks when masking.
    """

    shape: tuple[int, ...]  # leading shape of the outputs
    index: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    bad: torch.Tensor | None = None

    @classmethod
    def for_labels(cls, labels: torch.Tensor | None, shape: tuple[int, ...], vocab: int | None,
                   ignore_index: int, sync_free: bool | None = None) -> "Rows":
        if labels is None:
            return cls(shape)
        if not use_sync_free(sync_free, labels.device):
            return cls(shape, index=valid_rows(labels, vocab, ignore_index))
        if not torch.compiler.is_compiling() and _env_flag("FASTPREF_CHECK_LABELS"):
            check_label_range(labels, vocab, ignore_index)
        valid, bad = label_masks(labels, vocab, ignore_index)
        return cls(shape, keep=valid & ~bad, bad=bad)

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
        """Float32 [M] → shaped like the labels, 0 at ignored rows, NaN at bad ones (differentiable)."""
        if self.index is not None:
            out = torch.zeros(self.numel, device=out.device, dtype=out.dtype).index_copy(0, self.index, out)
        elif self.keep is not None:
            out = torch.where(self.keep, out, torch.zeros_like(out))
            out = torch.where(self.bad, torch.full_like(out, float("nan")), out)
        return out.reshape(self.shape)
