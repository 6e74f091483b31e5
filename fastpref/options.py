"""How logits are formed from hidden states: z = cap(h·Wᵀ + b) / temperature; the batch-invariant switch."""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class LogitOptions:
    """Logit transform shared by every backend.

    temperature: divides the (capped) logits; > 0.
    softcap: s in cap(x) = s·tanh(x/s) (Gemma 2/3 final-logit softcapping); None disables it.
    """

    temperature: float = 1.0
    softcap: float | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {t!r}")
        s = self.softcap
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0):
            raise ValueError(f"softcap must be None or a finite number > 0, got {s!r}")


# ---- batch-invariant mode (docs/batch-invariance.md) ------------------------------------------------------
_BATCH_INVARIANT: list[bool | None] = [None]  # set by the ``batch_invariant`` context manager; None = unset


@contextmanager
def batch_invariant(enabled: bool = True) -> Iterator[None]:
    """Within the block, fastpref's public functions default to ``batch_invariant=enabled``.

    Process-wide (not per thread); a function's own ``batch_invariant`` keyword wins over it, and it wins over
    the environment variable FASTPREF_BATCH_INVARIANT. The mode a forward ran in also governs its backward.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    saved = _BATCH_INVARIANT[0]
    _BATCH_INVARIANT[0] = enabled
    try:
        yield
    finally:
        _BATCH_INVARIANT[0] = saved


def use_batch_invariant(choice: bool | None) -> bool:
    """Whether a call runs batch-invariant: ``choice`` when given, else the innermost ``batch_invariant``
    block, else the environment variable FASTPREF_BATCH_INVARIANT (1/true/yes/on)."""
    if choice is not None:
        if not isinstance(choice, bool):
            raise TypeError(f"batch_invariant must be None or a bool, got {choice!r}")
        return choice
    if _BATCH_INVARIANT[0] is not None:
        return _BATCH_INVARIANT[0]
    return os.environ.get("FASTPREF_BATCH_INVARIANT", "").lower() in ("1", "true", "yes", "on")
