"""The extragradient optimiser of EGPO (Zhou+25) as a wrapper over any base optimiser's step.

θ_½ = step(θ, ∇L(θ));   θ ← step(θ, ∇L(θ_½)), the second step taken from θ and from the base optimiser's
state at θ (so with SGD: θ ← θ − η·∇L(θ − η·∇L(θ))). The second gradient comes from ``fresh`` when given: a
closure that draws new samples from π_θ½ (EGPO's Algorithm 1 and its official code: the online-IPO targets do
not depend on θ, so reusing π_θ's samples would make the second step a look-ahead on a fixed regression);
without it, from the same batch (the deterministic extragradient method).
"""
from __future__ import annotations

import copy
from typing import Callable

import torch


class ExtraGradient:
    """``opt.step(closure)``: the closure zeroes nothing, computes the loss and fills ``.grad`` at the current
    parameters (the caller's gradient reduction and clipping included) and returns what it likes."""

    def __init__(self, base: torch.optim.Optimizer):
        self.base = base
        self.param_groups = base.param_groups

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.base.param_groups for p in g["params"]]

    def step(self, closure: Callable, fresh: Callable | None = None):
        """One extragradient step; ``closure`` gives ∇L at θ, ``fresh`` (default: ``closure``) at θ_½.
        Returns what the second call returns."""
        params = self._params()
        self.zero_grad()
        closure()  # ∇L(θ)
        start = [p.detach().clone() for p in params]
        state = copy.deepcopy(self.base.state_dict())
        self.base.step()  # θ_½
        self.zero_grad()
        out = (fresh or closure)()  # ∇L(θ_½), on samples from π_θ½ when fresh is given
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
        self.base.load_state_dict(state)
        self.base.step()  # from θ with ∇L(θ_½)
        return out

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.base.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.base.load_state_dict(state)
