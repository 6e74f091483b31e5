"""How logits are formed from hidden states: z = cap(h·Wᵀ + b) / temperature."""
from __future__ import annotations

import math
from dataclasses import dataclass


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
