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
    def round_prompts(self, r: int) -> list[tuple[list[int], str]]:
        n = self.cfg.prompts_per_round
        idx = D.order(len(self.train_prompts), self.cfg.seed + 104_729, r * n, n)
        return [self.train_prompts[i] for i in idx]

    def _chunk_seed(self, r: int, c: int, what: int) -> int:
        return (self.cfg.seed * 1_000_003 + r * 10_007 + c) * 4 + what

    def _make_chunk(self, r: int, c: int, prompts: list[tuple[list[int], str]], half: bool = False) -> dict:
        """Sample, judge and build the items of one chunk of prompts (with reference log-probs); ``half``: the
        extragradient step's fresh samples (their own seeds)."""
        cfg, alg = self.cfg, self.alg
        ids = [p for p, _ in prompts]
        gen = dict(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                   eos_id=self.eos_id, pad_id=self.pad_id)
        samples = generate(self.policy, ids, n=cfg.samples, seed=self._chunk_seed(r, c, 2 * half), **gen)
        extra = None
        if alg.extra == "mixture":
            extra = generate(self.policy, ids, seed=self._chunk_seed(r, c, 2 * half + 1),
                             mixture=(self.ref, cfg.mixture_coef), **gen)
        elif alg.extra == "reference":
            extra = generate(self.ref, ids, seed=self._chunk_seed(r, c, 2 * half + 1), **gen)
        dec = lambda t: self.tok.decode(t, skip_special_tokens=True)  # noqa: E731
        K = cfg.samples
        opt = {"margin": cfg.margin}
        items, stats, groups = [], [], []
        for i, (p, text) in enumerate(prompts):
            s = samples[i * K:(i + 1) * K]
            g = A.Group(p, text, s, [dec(t) for t in s], extra[i] if extra else None,
                        dec(extra[i]) if extra else None)
            try:
                item, st = alg.build(g, self.judge, opt)
            except JudgeError as e:
                raise SystemExit(f"judge failed: {e}") from None
            rewards = self.judge.rewards([text] * K, g.texts)
            st = {**st, "length": sum(map(len, s)) / K,
                  "eos": sum(bool(t) and t[-1] == self.eos_id for t in s) / K}
            if rewards is not None:
                st["judge_score"] = sum(rewards) / K
                for role in ("chosen", "rejected"):
                    if item is not None and item.seqs.get(role) in s:
                        st[f"{role}_score"] = rewards[s.index(item.seqs[role])]
            stats.append(st)
            groups.append({"prompt": text, "samples": g.texts, "extra": g.extra_text, "rewards": rewards,
                           "item": None if item is None else len(items)})
            if item is not None:
                items.append(item)
        A.reference_logps(items, policy=self.policy, ref=self.ref, loss=self.loss, reference=cfg.reference,
                          pad_id=self.pad_id, backend=cfg.backend)
        return {"chunk": c, "items": [vars(it) for it in items], "stats": stats, "groups": groups}

    def round_data(self, r: int, half: bool = False) -> dict:
        """The data of round r: read from disk, or generated (each rank its chunks), gathered and saved;
        ``half``: the fresh samples of an online extragradient step, drawn from π_θ½ (``round-XXXXX-half.json``)."""
        path = self.rdir / f"round-{r:05d}{'-half' if half else ''}.json"
        if not path.is_file():
            prompts = self.round_prompts(r)
            gb = self.cfg.gen_batch
            chunks = [prompts[i:i + gb] for i in range(0, len(prompts), gb)]
            mine = [self._make_chunk(r, c, chunks[c], half) for c in range(self.d.rank, len(chunks), self.d.world)]
            done = sorted((ch for part in _gather(mine, self.d) for ch in part), key=lambda ch: ch["chunk"])
            data = {"round": r, "algorithm": self.alg.name, "step": self.step,
                    "items": [it for ch in done for it in ch["items"]],
                    "stats": [s for ch in done for s in ch["stats"]],
                    "groups": [g for ch in done for g in ch["groups"]]}
            self.out.write_json(path, data, checksum=True)
        data = self.out.read_json(path)
        data["items"] = [A.Item(**it) for it in data["items"]]
        return data

    def round_record(self, r: int, data: dict) -> dict:
        st = data["stats"]
        rec = {"step": self.step, "round": r, "kind": "generate", "items": len(data["items"]), "prompts": len(st)}
        for k in sorted({k for s in st for k in s}):
            v = [s[k] for s in st if s.get(k) is not None]
            if v:
                rec[f"gen/{k}"] = sum(v) / len(v)
        return rec

    # ------------------------------------------------------------------------------------------- training
    def steps_in_round(self, n_items: int) -> int:
        """One optimiser step on a freshly sampled batch (online algorithms); else ``epochs`` passes over the
        round's items in batches that never cross an epoch (the last batch of an epoch may be shorter)."""
        if not n_items:
            return 0
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
        idx = D.epoch_batch(len(items), self.cfg.seed + 7919 * (r + 1), self.round_step, self.cfg.batch_size)
        per = math.ceil(len(idx) / d.world)
        return self._closure([items[i] for i in idx[d.rank * per:(d.rank + 1) * per]], len(idx))

    def train_step(self, r: int, items: list[A.Item]) -> dict:
        sched = (self.step, self.cfg.rounds, 0.0) if self.alg.online else \
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
