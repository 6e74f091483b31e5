"""Random problem instances and the backends under test."""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

import fastpref
from fastpref import backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ["torch", "triton", "native"]


def require_backend(name: str, dtype: torch.dtype = torch.float32) -> None:
    """Skip when a backend cannot run here, unless FASTPREF_REQUIRE_BACKENDS names it (then fail)."""
    required = [b for b in os.environ.get("FASTPREF_REQUIRE_BACKENDS", "").split(",") if b]
    try:
        backends.resolve(name, DEVICE, dtype)
    except ValueError as why:
        if name in required:
            raise AssertionError(f"required backend {name!r} unavailable: {why}") from why
        pytest.skip(str(why))


@dataclass
class Case:
    N: int = 77
    D: int = 48
    V: int = 301
    dtype: torch.dtype = torch.float32
    bias: bool = False
    softcap: float | None = None
    temperature: float = 1.0
    ignore_frac: float = 0.0
    peaked: bool = False  # weight rows copied from hidden rows: near one-hot softmaxes
    scale: float = 1.0  # multiplies hidden: logits up to about scale·|h||w|
    seed: int = 0

    def make(self):
        g = torch.Generator().manual_seed(self.seed)
        h = torch.randn(self.N, self.D, generator=g, dtype=torch.float64)
        w = torch.randn(self.V, self.D, generator=g, dtype=torch.float64) / self.D ** 0.5
        if self.peaked and self.N:
            k = min(self.N, self.V) // 2
            w[:k] = 2.0 * h[:k]
        h = h * self.scale
        b = torch.randn(self.V, generator=g, dtype=torch.float64) if self.bias else None
        labels = torch.randint(0, self.V, (self.N,), generator=g)
        if self.ignore_frac:
            labels[torch.rand(self.N, generator=g) < self.ignore_frac] = -100
        to = lambda x: None if x is None else x.to(device=DEVICE, dtype=self.dtype)  # noqa: E731
        return to(h), to(w), to(b), labels.to(DEVICE)

    def upstream(self, k: int):
        g = torch.Generator().manual_seed(1000 + self.seed)
        return [torch.randn(self.N, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(k)]


__all__ = ["BACKENDS", "Case", "DEVICE", "fastpref", "require_backend"]
