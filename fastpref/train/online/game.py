"""Small games: the online algorithms on a tabular policy with an exact preference matrix, through the
trainer's own item builders, registry losses (:class:`~.algorithms.ItemLoss`) and optimiser wrapper
(:class:`~.extragradient.ExtraGradient`); the judge is the matrix.

The policy is π_θ(y | x) = softmax(θ[x])_y over A actions in C contexts; a prompt is ``[x]`` and a completion
``[y]`` (one token). A step does not sample: it takes the *exact expectation* over what the trainer samples,
every group of K actions (and the extra action from π_ref or the geometric mixture) weighted by its probability
under the sampler, without gradient through the weights (as through a sample), divided by the total weight of
the groups that gave an item (the trainer's mean over items). So a run is deterministic and each step is the
trainer's expected step. Iterative algorithms take ``inner`` steps on one round's expected data.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from . import algorithms as A
from .extragradient import ExtraGradient
from .judges import Judge

D64 = torch.float64


@dataclass
class Game:
    """P [C, A, A] float64 with P[x, y, y′] = P(y ≻ y′ | x) and P + Pᵀ = 1; ref [C, A] π_ref, rows summing to 1."""

    P: Tensor
    ref: Tensor


def intransitive(strength: Sequence[float] = (0.5, 0.5, 0.5), ref: Sequence[float] = (0.5, 0.3, 0.2)) -> Game:
    """Rock-paper-scissors (hard by default: P ∈ {0, ½, 1}), one context: action 0 beats 1 by ``strength[0]``,
    1 beats 2 by ``strength[1]``, 2 beats 0 by ``strength[2]`` (P = ½ ± strength)."""
    P = torch.full((3, 3), 0.5, dtype=D64)
    for k, s in enumerate(strength):
        i, j = k, (k + 1) % 3
        P[i, j], P[j, i] = 0.5 + s, 0.5 - s
    return Game(P[None], torch.tensor([ref], dtype=D64))


def bradley_terry(rewards: Sequence[float] = (1.0, 0.0, -1.0), ref: Sequence[float] = (0.2, 0.3, 0.5)) -> Game:
    """A transitive game, one context: P(y ≻ y′) = σ(r_y − r_y′)."""
    r = torch.tensor(rewards, dtype=D64)
    return Game(torch.sigmoid(r[:, None] - r[None, :])[None], torch.tensor([ref], dtype=D64))


class Table(nn.Module):
    """θ [C, A] float64 logits; ``log_probs()`` = log π_θ [C, A]."""

    def __init__(self, probs: Tensor):
        super().__init__()
        self.theta = nn.Parameter(probs.log().clone())

    def log_probs(self) -> Tensor:
        return torch.log_softmax(self.theta, -1)


def table_token_logps(policy: Table, seqs: list[tuple[list[int], list[int]]], *, pad_id: int = 0,
                      backend: str = "auto") -> tuple[Tensor, Tensor]:
    """As :func:`~.logps.token_logps` for one-token completions: (log π(y | x) [S, 1] float64, mask [S, 1])."""
    lp = policy.log_probs()
    tok = lp[[p[0] for p, _ in seqs], [c[0] for _, c in seqs]][:, None]
    return tok, torch.ones_like(tok, dtype=torch.bool)


@torch.no_grad()
def table_completion_logps(policy: Table, seqs: list[tuple[list[int], list[int]]], *, pad_id: int = 0,
                           backend: str = "auto") -> list[list[float]]:
    """As :func:`~.logps.completion_logps`: one float per completion, no grad."""
    return [[float(v)] for v in table_token_logps(policy, seqs)[0][:, 0]]


class MatrixJudge(Judge):
    """The exact matrix as the judge: prompt text ``"x"``, completion texts ``"y"``."""

    name = "exact preference matrix"

    def __init__(self, P: Tensor):
        self.P = P

    def prefer(self, prompts, a, b) -> list[float]:
        return [float(self.P[int(x), int(y), int(z)]) for x, y, z in zip(prompts, a, b)]


@dataclass
class Player:
    """One algorithm's preset driven on a game: the loss, the reference table and the sampler's settings."""

    alg: A.Algorithm
    game: Game
    loss: A.ItemLoss
    ref: Table
    samples: int
    reference: str
    mixture: float

    def extra_probs(self, policy: Table) -> Tensor | None:
        """[C, A]: the distribution of the extra sample (π_ref or the geometric mixture ∝ π^(1−m)·π_ref^m)."""
        if self.alg.extra == "reference":
            return self.game.ref
        if self.alg.extra == "mixture":
            logits = (1 - self.mixture) * policy.log_probs().detach() + self.mixture * self.game.ref.log()
            return torch.softmax(logits, -1)
        return None

    def batch(self, policy: Table) -> tuple[list[A.Item], Tensor]:
        """Every group the trainer could sample from π_θ now, built into items, with its probability [N]."""
        judge, pi, extra = MatrixJudge(self.game.P), policy.log_probs().detach().exp(), self.extra_probs(policy)
        items, weights = [], []
        C, n = pi.shape
        for x in range(C):
            for ys in itertools.product(range(n), repeat=self.samples):
                w = math.prod(float(pi[x, y]) for y in ys)
                for e in range(n) if extra is not None else [None]:
                    g = A.Group([x], str(x), [[y] for y in ys], [str(y) for y in ys],
                                None if e is None else [e], None if e is None else str(e))
                    item, _ = self.alg.build(g, judge, {})
                    we = w * (1.0 if e is None else float(extra[x, e]))
                    if item is not None and we > 0:
                        items.append(item)
                        weights.append(we)
        A.reference_logps(items, policy=policy, ref=self.ref, loss=self.loss, reference=self.reference, pad_id=0,
                          logps=table_completion_logps)
        return items, torch.tensor(weights, dtype=D64)

    def backward(self, policy: Table, batch: tuple[list[A.Item], Tensor]) -> float:
        """∇ of the expected per-item loss into ``.grad``; returns the loss."""
        return expected_backward(self.loss, policy, batch)


def expected_backward(loss: A.ItemLoss, policy: Table, batch: tuple[list[A.Item], Tensor]) -> float:
    """∇ of Σ_i w_i·L_i / Σ_i w_i (items i with weights w [N]) into ``.grad``; returns the value."""
    items, w = batch
    if not items:  # every group dropped (ties): no step, as in the trainer
        return 0.0
    value = (w * loss(policy, items)).sum() / w.sum()
    value.backward()
    return float(value.detach())


def play(algorithm: str, game: Game, *, steps: int, lr: float, hparams: dict | None = None, inner: int = 1,
         extragradient: bool | None = None, fresh: bool = True, mixture: float = 0.5,
         samples: int | None = None) -> list[Tensor]:
    """Run ``algorithm``'s preset on ``game`` from π_θ = π_ref with SGD(``lr``): ``steps`` online steps, or
    ``steps`` rounds of ``inner`` steps each on the round's data (iterative algorithms). ``extragradient``
    (default: the preset's) wraps SGD in :class:`ExtraGradient`, its second gradient on data drawn from π_θ½
    (``fresh``, EGPO) or on the step's data again; ``samples``: K (default the preset's; A^K groups a step).
    Returns π_θ [C, A] at the start and after each step/round."""
    alg = A.get(algorithm)
    loss = A.ItemLoss(alg.loss, {**alg.hparams, **(hparams or {})}, pad_id=0, logps=table_token_logps)
    player = Player(alg, game, loss, Table(game.ref), samples or alg.samples, alg.reference, mixture)
    policy = Table(game.ref)
    base = torch.optim.SGD(policy.parameters(), lr=lr)
    eg = alg.extragradient if extragradient is None else extragradient
    opt = ExtraGradient(base) if eg else base
    out = [policy.log_probs().detach().exp()]
    for _ in range(steps):
        data = player.batch(policy)
        for _ in range(inner):
            if eg:
                opt.step(lambda: player.backward(policy, data),
                         (lambda: player.backward(policy, player.batch(policy))) if fresh else None)
            else:
                opt.zero_grad()
                player.backward(policy, data)
                opt.step()
            opt.zero_grad()
        out.append(policy.log_probs().detach().exp())
    return out


def offline_optimum(loss_name: str, game: Game, *, beta: float, steps: int, lr: float) -> Tensor:
    """Train a registry pairwise loss (``sigmoid`` = DPO, ``ipo``) from π_ref with SGD on its population: pairs
    y, y′ ~ π_ref labelled by Bernoulli(P(y ≻ y′)), i.e. every (chosen y, rejected y′) with weight
    π_ref(y)·π_ref(y′)·P(y ≻ y′). Returns π_θ [C, A] after ``steps`` steps."""
    loss = A.ItemLoss({loss_name: 1.0}, {"beta": beta}, pad_id=0, logps=table_token_logps)
    C, n, _ = game.P.shape
    items = [A.Item([x], {"chosen": [y], "rejected": [z]}, {"chosen_lengths": 1.0, "rejected_lengths": 1.0})
             for x in range(C) for y in range(n) for z in range(n)]
    w = torch.tensor([float(game.ref[x, y] * game.ref[x, z] * game.P[x, y, z]) for x in range(C) for y in range(n)
                      for z in range(n)], dtype=D64)
    ref, policy = Table(game.ref), Table(game.ref)
    A.reference_logps(items, policy=policy, ref=ref, loss=loss, reference="initial", pad_id=0,
                      logps=table_completion_logps)
    opt = torch.optim.SGD(policy.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        expected_backward(loss, policy, (items, w))
        opt.step()
    return policy.log_probs().detach().exp()


# ------------------------------------------------------------------------------------------------ gold
def regularised_nash(game: Game, beta: float, iters: int = 5000) -> Tensor:
    """The Nash policy of the β-regularised game max_π min_π′ P(π ≻ π′) − β·KL(π‖π_ref) + β·KL(π′‖π_ref)
    [C, A]: the fixed point π ∝ π_ref·exp(P(y ≻ π)/β), found by mirror-prox on the policy itself (entropic
    mirror map, step 1/(1 + β)) in float64, independent of the losses."""
    eta = 1.0 / (1.0 + beta)
    log_ref = game.ref.log()
    pi = game.ref.clone()

    def prox(center: Tensor, opponent: Tensor) -> Tensor:
        field = torch.einsum("xab,xb->xa", game.P, opponent)
        return torch.softmax((1 - eta * beta) * center.log() + eta * beta * log_ref + eta * field, -1)

    for _ in range(iters):
        pi = prox(pi, prox(pi, pi))
    return pi


def kl(p: Tensor, q: Tensor) -> float:
    """KL(p‖q) averaged over contexts, p and q [C, A]."""
    return float((p * (p.log() - q.log())).sum(-1).mean())


def win_rate(game: Game, pi: Tensor, other: Tensor) -> float:
    """P(π ≻ π′) averaged over contexts."""
    return float(torch.einsum("xa,xab,xb->x", pi, game.P, other).mean())
