"""The training steps within one round of an online run: the optimizer step on a batch of the round's items
(this rank's share, gradients summed over ranks, clipped), the extragradient step (its second gradient on fresh
samples from π_θ½ for online algorithms), and the learning-rate schedule.

A mixin of :class:`~fastpref.train.online.loop.OnlineRun` (through :class:`.rounds.Rounds`): it reads the run's
settings, policy, loss, optimizer and process group, and ``round_data`` for the extragradient's fresh samples.
"""
from __future__ import annotations

import math
import time

import torch

from .. import data as D
from ..run import stop_if_not_finite
from . import algorithms as A
from .extragradient import ExtraGradient


class RoundSteps:
    """The training steps of an online run."""

    def steps_in_round(self, n_items: int) -> int:
        """One optimiser step on a freshly sampled batch (online algorithms; ``epochs`` steps on all of it for an
        RL algorithm); else ``epochs`` passes over the round's items in batches that never cross an epoch (the
        last batch of an epoch may be shorter)."""
        if not n_items:
            return 0
        if self.alg.rl:
            return int(self.cfg.epochs)
        return 1 if self.alg.online else math.ceil(self.cfg.epochs * math.ceil(n_items / self.cfg.batch_size))

    def _closure(self, items: list[A.Item], n_global: int):
        def closure() -> tuple[float, float]:
            loss_sum = self.loss(self.policy, items).sum() if items else None
            if loss_sum is not None:
                (loss_sum / n_global).backward()
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            flat = torch.cat([g.reshape(-1) for g in grads]) if self.d.active else None
            if flat is not None:
                self.d.sum_(flat)
                off = 0
                for p, g in zip(self.params, grads):
                    p.grad = flat[off:off + g.numel()].view_as(g).clone()
                    off += g.numel()
            gn = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
            total = torch.tensor([float(loss_sum.detach()) if loss_sum is not None else 0.0], dtype=torch.float64)
            self.d.sum_(total)
            loss = float(total) / max(n_global, 1)
            stop_if_not_finite(self.step + 1, "online", {"loss": loss, "grad_norm": float(gn)})  # before a step
            return loss, float(gn)
        return closure

    def _batch_closure(self, r: int, items: list[A.Item]):
        """The closure of this step's batch of ``items``, this rank's share."""
        d = self.d
        size = len(items) if self.alg.rl else self.cfg.batch_size  # RL: the G samples of every prompt
        idx = D.epoch_batch(len(items), self.cfg.seed + 7919 * (r + 1), self.round_step, size)
        per = math.ceil(len(idx) / d.world)
        return self._closure([items[i] for i in idx[d.rank * per:(d.rank + 1) * per]], len(idx))

    def train_step(self, r: int, items: list[A.Item]) -> dict:
        sched = (self.step, self.cfg.rounds * self.steps_in_round(len(items)), 0.0) if self.alg.online else \
            (self.round_step, self.steps_in_round(len(items)), 0.1)
        for g in self.opt.param_groups:
            g["lr"] = self.cfg.lr * lr_factor(self.cfg.lr_schedule, *sched)
        closure = self._batch_closure(r, items)
        if isinstance(self.opt, ExtraGradient):  # online: the second gradient on fresh samples from π_θ½ (EGPO)
            fresh = (lambda: self._batch_closure(r, self.round_data(r, half=True)["items"])()) \
                if self.alg.online else None
            loss, gn = self.opt.step(closure, fresh)
        else:
            self.opt.zero_grad(set_to_none=True)
            loss, gn = closure()
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.round_step += 1
        return {"step": self.step, "round": r, "kind": "train", "loss": loss, "grad_norm": gn,
                "time": time.time() - self.t0}


def lr_factor(schedule: str, step: int, total: int, warmup: float) -> float:
    """The learning-rate multiplier at ``step`` of ``total``: 1 (``constant``), or ``linear``: a linear warm-up
    over the first ``warmup`` fraction of the steps, then a linear decay to 0 (Hugging Face's linear schedule)."""
    if schedule == "constant" or total <= 0:
        return 1.0
    w = int(warmup * total)
    return (step + 1) / w if step < w else max(0.0, (total - step) / max(1, total - w))
