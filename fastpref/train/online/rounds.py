"""The data of one round of an online run: prompts of the round, samples from π_t, judgements, the algorithm's
items with the references' log-probs; generated in chunks, gathered over ranks and written to
``rounds/round-XXXXX.json`` before training on it (the training steps: :mod:`.steps`).

A mixin of :class:`~fastpref.train.online.loop.OnlineRun`: it reads the run's settings, policy, reference,
judge and loss.
"""
from __future__ import annotations

from pathlib import Path

import torch.distributed as tdist

from .. import data as D
from ..dist import Dist
from ..generate import generate
from . import algorithms as A
from .judges import JudgeError
from .steps import RoundSteps


def _gather(obj, d: Dist) -> list:
    """Every rank's object, in rank order (a one-element list in a single process)."""
    if not d.active:
        return [obj]
    out = [None] * d.world
    tdist.all_gather_object(out, obj)
    return out


class RoundData:
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


class Rounds(RoundData, RoundSteps):
    """The round data and the training steps of an online run."""
