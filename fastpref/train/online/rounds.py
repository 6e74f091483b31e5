"""What happens within one round of an online run: its data (prompts of the round, samples from π_t,
judgements, the algorithm's items with the references' log-probs; generated in chunks, gathered over ranks and
written to ``rounds/round-XXXXX.json`` before training on it) and its training steps (the optimizer step on a
batch of items, extragradient included).

A mixin of :class:`~fastpref.train.online.loop.OnlineRun`: it reads the run's settings, policy, reference,
judge, loss and optimizer.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.distributed as tdist

from .. import data as D
from ..dist import Dist
from ..generate import generate
from ..run import stop_if_not_finite
from . import algorithms as A
from .extragradient import ExtraGradient
from .judges import JudgeError


def _gather(obj, d: Dist) -> list:
    """Every rank's object, in rank order (a one-element list in a single process)."""
    if not d.active:
        return [obj]
    out = [None] * d.world
    tdist.all_gather_object(out, obj)
    return out


class Rounds:
    """The round data and the training steps of an online run."""

    # ------------------------------------------------------------------------------------------- round data
    def _round_index(self, r: int) -> list[int]:
        n = self.cfg.prompts_per_round
        return D.order(len(self.train_prompts), self.cfg.seed + 104_729, r * n, n)

    def round_prompts(self, r: int) -> list[tuple[list[int], str]]:
        return [self.train_prompts[i] for i in self._round_index(r)]

    def _chunk_seed(self, r: int, c: int, what: int) -> int:
        return (self.cfg.seed * 1_000_003 + r * 10_007 + c) * 4 + what

    def _sample(self, r: int, c: int, ids: list[list[int]], half: bool) -> tuple[list, list | None]:
        """K samples per prompt from π_t, and the extra sample per prompt (mixture or π_ref) if the algorithm has
        one; ``half``: the extragradient step's fresh samples (their own seeds)."""
        cfg, alg = self.cfg, self.alg
        gen = dict(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                   eos_id=self.eos_id, pad_id=self.pad_id)
        samples = generate(self.policy, ids, n=cfg.samples, seed=self._chunk_seed(r, c, 2 * half), **gen)
        extra = None
        if alg.extra == "mixture":
            extra = generate(self.policy, ids, seed=self._chunk_seed(r, c, 2 * half + 1),
                             mixture=(self.ref, cfg.mixture_coef), **gen)
        elif alg.extra == "reference":
            extra = generate(self.ref, ids, seed=self._chunk_seed(r, c, 2 * half + 1), **gen)
        return samples, extra

    def _make_chunk(self, r: int, c: int, prompts: list[tuple[list[int], str]], half: bool = False,
                    teachers: list[list[int]] | None = None) -> dict:
        """Sample, judge and build the items of one chunk of prompts (with reference log-probs); ``half``: the
        extragradient step's fresh samples; ``teachers``: each prompt's teacher answer, a candidate after the K
        samples (DNO)."""
        samples, extra = self._sample(r, c, [p for p, _ in prompts], half)
        dec = lambda t: self.tok.decode(t, skip_special_tokens=True)  # noqa: E731
        K = self.cfg.samples
        opt = {"margin": self.cfg.margin}
        items, stats, groups = [], [], []
        for i, (p, text) in enumerate(prompts):
            s = samples[i * K:(i + 1) * K]
            cands = s + ([teachers[i]] if teachers else [])
            texts = [dec(t) for t in cands]
            try:
                rewards = self.judge.rewards([text] * len(cands), texts)
                g = A.Group(p, text, cands, texts, extra[i] if extra else None, dec(extra[i]) if extra else None,
                            rewards)
                item, st = self.alg.build(g, self.judge, opt)
            except JudgeError as e:
                raise SystemExit(f"judge failed: {e}") from None
            new = [] if item is None else item if isinstance(item, list) else [item]
            stats.append(self._group_stats(st, item, s, cands, rewards, teacher=bool(teachers)))
            groups.append({"prompt": text, "samples": g.texts[:K], "extra": g.extra_text, "rewards": rewards,
                           "item": [len(items) + k for k in range(len(new))] if isinstance(item, list)
                           else len(items) if new else None})  # RL: the indices of the group's items
            if teachers:
                groups[-1]["teacher"] = g.texts[K]
            items += new
        A.reference_logps(items, policy=self.policy, ref=self.ref, loss=self.loss, reference=self.cfg.reference,
                          pad_id=self.pad_id, backend=self.cfg.backend)
        return {"chunk": c, "items": [vars(it) for it in items], "stats": stats, "groups": groups}

    def _group_stats(self, st: dict, item: A.Item | list[A.Item] | None, samples: list, cands: list,
                     rewards: list | None, teacher: bool) -> dict:
        """A group's statistics: the builder's, the samples' length and EOS fraction, the judge's mean reward of
        the samples and of the chosen / rejected candidates, and whether the teacher's answer was chosen."""
        K = len(samples)
        st = {**st, "length": sum(map(len, samples)) / K,
              "eos": sum(bool(t) and t[-1] == self.eos_id for t in samples) / K}
        if teacher:
            st["teacher_chosen"] = float(item is not None and item.seqs["chosen"] == cands[K])
        if rewards is not None:
            st["judge_score"] = sum(rewards[:K]) / K
            if teacher:
                st["teacher_score"] = rewards[K]
            for role in ("chosen", "rejected"):
                if isinstance(item, A.Item) and item.seqs.get(role) in cands:
                    st[f"{role}_score"] = rewards[cands.index(item.seqs[role])]
        return st

    def round_path(self, r: int, half: bool = False) -> Path:
        return self.rdir / f"round-{r:05d}{'-half' if half else ''}.json"

    def read_round(self, path: Path) -> dict:
        """A round's data as saved (its checksum verified), its items as :class:`~.algorithms.Item`."""
        data = self.out.read_json(path)
        data["items"] = [A.Item(**it) for it in data["items"]]
        return data

    def round_data(self, r: int, half: bool = False) -> dict:
        """The data of round r: read from disk, or generated (each rank its chunks), gathered and saved;
        ``half``: the fresh samples of an online extragradient step, drawn from π_θ½ (``round-XXXXX-half.json``)."""
        path = self.round_path(r, half)
        if not path.is_file():
            idx = self._round_index(r)
            prompts = [self.train_prompts[i] for i in idx]
            teachers = [self.teachers[i] for i in idx] if self.teachers else None
            gb = self.cfg.gen_batch
            cut = lambda xs, c: xs[c * gb:(c + 1) * gb] if xs else None  # noqa: E731
            n_chunks = -(-len(prompts) // gb)
            mine = [self._make_chunk(r, c, cut(prompts, c), half, cut(teachers, c))
                    for c in range(self.d.rank, n_chunks, self.d.world)]
            done = sorted((ch for part in _gather(mine, self.d) for ch in part), key=lambda ch: ch["chunk"])
            data = {"round": r, "algorithm": self.alg.name, "step": self.step,
                    "items": [it for ch in done for it in ch["items"]],
                    "stats": [s for ch in done for s in ch["stats"]],
                    "groups": [g for ch in done for g in ch["groups"]]}
            self.out.write_json(path, data, checksum=True)
        return self.read_round(path)

    def training_items(self, r: int, data: dict) -> list[A.Item]:
        """The items the steps of round r draw their batches from: the round's own, and for an accumulating
        algorithm (XPO, as the paper) before them those of the ``--xpo-history`` rounds before r (all of them by
        default), read back from their saved round files (so a resumed run draws exactly the same batches)."""
        h = self.cfg.xpo_history
        if not self.alg.accumulate or h == 0:
            return data["items"]
        first = 0 if h is None else max(0, r - h)
        cache = self.past_items
        for k in [k for k in cache if k < first]:
            del cache[k]
        for k in range(first, r):
            if k not in cache:
                cache[k] = self.read_round(self.round_path(k))["items"]
        return [it for k in range(first, r) for it in cache[k]] + data["items"]

    def round_record(self, r: int, data: dict, pool: int | None = None) -> dict:
        """The round's ``generate`` record: its items and prompts, the mean of each group statistic, and
        ``pool``, the items its steps draw from when that is more than the round's own (XPO)."""
        st = data["stats"]
        rec = {"step": self.step, "round": r, "kind": "generate", "items": len(data["items"]), "prompts": len(st)}
        if pool is not None and pool != len(data["items"]):
            rec["pool"] = pool
        for k in sorted({k for s in st for k in s}):
            v = [s[k] for s in st if s.get(k) is not None]
            if v:
                rec[f"gen/{k}"] = sum(v) / len(v)
        return rec

    # ------------------------------------------------------------------------------------------- training
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
