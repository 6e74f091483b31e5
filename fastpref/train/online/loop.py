"""The one round loop of every online / iterative algorithm: sample from π_t, judge, build items (with the
references' log-probs), train, evaluate, checkpoint; exact resume from any checkpoint.

Each round's data (samples, judgements, items, reference log-probs) is written to
``rounds/round-XXXXX.json`` before training on it, so a resumed run trains on exactly the same data. A round
is split into generation chunks of ``gen_batch`` prompts whose sampler seed depends only on (seed, round,
chunk): under torchrun rank r generates chunks r, r + world, ..., and the gathered data equals a single
process's. Gradients are summed over ranks (each rank's loss is its share of the global batch mean).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as tdist
from torch import nn

from .. import checkpoint as C
from .. import data as D
from ..dist import Dist, setup
from ..model import frozen_copy, load_model, tiny_model
from ..evaluate import mean_scores, prompt_ids, prompt_text
from ..synthetic import verify
from . import algorithms as A
from .config import OnlineConfig
from .extragradient import ExtraGradient
from .generate import generate
from .judges import JudgeError, Judge, make_judge
from .logps import mean_token_kl

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _gather(obj, d: Dist) -> list:
    """Every rank's object, in rank order (a one-element list in a single process)."""
    if not d.active:
        return [obj]
    out = [None] * d.world
    tdist.all_gather_object(out, obj)
    return out


class OnlineRun:
    def __init__(self, cfg: OnlineConfig, d: Dist):
        self.cfg, self.d = cfg, d
        self.t0 = time.time()
        self.alg = A.get(cfg.algorithm)
        self.out = Path(cfg.output_dir)
        self.ckdir = self.out / "checkpoints"
        self.rdir = self.out / "rounds"
        if d.main:
            self.rdir.mkdir(parents=True, exist_ok=True)
        d.barrier()
        self.log = print if d.main else (lambda *a, **k: None)
        self.tok = self._tokenizer()
        self.pad_id = D.pad_id_of(self.tok)
        self.eos_id = self.tok.eos_token_id
        try:
            self.judge: Judge = make_judge(cfg.judge, synthetic=cfg.synthetic, temperature=cfg.judge_temperature,
                                           device=d.device)
        except JudgeError as e:
            raise SystemExit(str(e)) from None
        self.train_prompts, self.eval_prompts = self._prompts()
        self.policy = self._starting_policy().to(d.device).train()
        ref = load_model(cfg.ref_model) if cfg.ref_model else frozen_copy(self.policy)
        dtype = DTYPES.get(cfg.ref_dtype or "", next(self.policy.parameters()).dtype)
        self.ref = frozen_copy(ref).to(d.device, dtype)
        self.loss = A.ItemLoss(self.alg.loss, cfg.hparams(), pad_id=self.pad_id, backend=cfg.backend)
        params = [p for p in self.policy.parameters() if p.requires_grad]
        self.params = params
        base = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.opt = ExtraGradient(base) if cfg.extragradient else base
        self.step = self.round = self.round_step = 0
        self.history: list[dict] = []

    # ------------------------------------------------------------------------------------------- set-up
    def _tokenizer(self):
        src = self.cfg.tokenizer or self.cfg.model
        if src is None:
            from ..synthetic import load_tokenizer

            return load_tokenizer()
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(src, local_files_only=True)

    def _encode(self, prompt) -> tuple[list[int], str]:
        """(token ids as training sees them, the prompt text the judge reads)."""
        return prompt_ids(self.tok, prompt), prompt_text(self.tok, prompt)

    def _read_prompts(self, path: str) -> list:
        out = []
        for where, row in D.read_rows(path):
            if isinstance(row, D.DataError):
                raise SystemExit(str(row))
            if not isinstance(row, dict) or "prompt" not in row:
                raise SystemExit(f"{where}: expected a row with a 'prompt' field")
            out.append(row["prompt"])
        if not out:
            raise SystemExit(f"{path}: no prompts")
        return out

    def _prompts(self) -> tuple[list[tuple[list[int], str]], list[tuple[list[int], str]]]:
        cfg = self.cfg
        if cfg.synthetic:
            from ..synthetic import make_task

            rows, held = make_task(cfg.synthetic_train, cfg.synthetic_eval)
            train, ev = [r["prompt"] for r in rows], [r["prompt"] for r in held]
        else:
            train = self._read_prompts(cfg.prompts)
            ev = self._read_prompts(cfg.eval_prompts) if cfg.eval_prompts else train[:64]
        return [self._encode(p) for p in train], [self._encode(p) for p in ev]

    def _starting_policy(self) -> nn.Module:
        """--model, or the tiny demo model after a short SFT warm-up on mixed-quality demonstrations (the offline
        trainer, run once into ``sft/``; synthetic task only; see ``demo.py``)."""
        cfg = self.cfg
        if cfg.model is not None:
            return load_model(cfg.model)
        with torch.random.fork_rng(devices=[]):
            model = tiny_model(len(self.tok), cfg.seed)
        if cfg.sft_steps and cfg.synthetic:
            from .demo import warm_up

            sft = self.out / "sft"
            if self.d.main and not cfg.resume:
                shutil.rmtree(sft, ignore_errors=True)
            if self.d.main and not (sft / "final" / "model.safetensors").is_file():
                warm_up(sft, steps=cfg.sft_steps, lr=cfg.sft_lr, correct_fraction=cfg.demo_correct_fraction,
                        n_train=cfg.synthetic_train, n_eval=cfg.synthetic_eval, seed=cfg.seed, device=cfg.device,
                        backend=cfg.backend, threads=cfg.threads, resume=bool(cfg.resume))
            self.d.barrier()
            from safetensors.torch import load_file

            model.load_state_dict(load_file(str(sft / "final" / "model.safetensors")))
        return model

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
            if self.d.main:
                _atomic_json(path, data)
            self.d.barrier()
        data = json.loads(path.read_text())
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
            return float(total) / max(n_global, 1), float(gn)
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

    # ------------------------------------------------------------------------------------------- evaluation
    def _answers(self, model: nn.Module) -> list[list[int]]:
        return generate(model, [p for p, _ in self.eval_prompts], greedy=True, max_new_tokens=self.cfg.max_new_tokens,
                        eos_id=self.eos_id, pad_id=self.pad_id)

    def evaluate(self, r: int) -> dict:
        """Greedy answers on held-out prompts: verifier accuracy (synthetic), judge win-rate against the
        starting policy's answers, KL(π_θ‖π_ref) per token on them, their length. Rank 0 only."""
        rec = {"step": self.step, "round": r, "kind": "eval"}
        if self.d.main:
            answers = self._answers(self.policy)
            texts = [self.tok.decode(a, skip_special_tokens=True) for a in answers]
            prompts = [t for _, t in self.eval_prompts]
            start_file = self.rdir / "start_answers.json"
            if not start_file.is_file():
                _atomic_json(start_file, texts)
            start = json.loads(start_file.read_text())
            rec["eval/winrate_vs_start"] = sum(self.judge.prefer(prompts, texts, start)) / len(texts)
            rewards = self.judge.rewards(prompts, texts)
            if rewards is not None:
                rec["eval/judge_score"] = sum(rewards) / len(rewards)
            if self.cfg.synthetic:
                sc = mean_scores(prompts, texts, verify)  # the offline demo's verifier
                rec["eval/greedy_accuracy"] = sc["exact_match"]
                rec["eval/greedy_digit_accuracy"] = sc["digit_accuracy"]
            rec["eval/kl_to_ref"] = mean_token_kl(self.policy, self.ref, [(p, a or [self.eos_id]) for (p, _), a in
                                                                         zip(self.eval_prompts, answers)],
                                                  pad_id=self.pad_id, backend=self.cfg.backend)
            rec["eval/length"] = sum(map(len, answers)) / len(answers)
            self.history.append(rec)
            self.write(rec)
        self.d.barrier()
        return rec

    def write(self, rec: dict) -> None:
        if self.d.main:
            with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")

    # ------------------------------------------------------------------------------------------- checkpoints
    def save(self) -> None:
        d = self.d
        state = {k: v.detach().cpu().clone() for k, v in self.policy.state_dict().items()}
        trainer = {"step": self.step, "round": self.round, "round_step": self.round_step,
                   "optimizer": self.opt.state_dict(), "rng": torch.get_rng_state(), "world": d.world}
        if d.main:
            folder = C.write(self.ckdir / f"step-{self.step:08d}", state, trainer,
                             {"step": self.step, "round": self.round, "round_step": self.round_step,
                              "algorithm": self.alg.name, "time": time.time()})
            C.prune(self.ckdir, self.cfg.keep_checkpoints, protect=folder)
        d.barrier()

    def resume(self) -> bool:
        cfg = self.cfg
        if cfg.resume in (None, "", "no"):
            self.fresh_start()
            return False
        folder = C.latest_valid(self.ckdir, warn=self.log) if cfg.resume == "auto" else Path(cfg.resume)
        if folder is None:
            self.log(f"--resume auto: no valid checkpoint in {self.ckdir}; starting from scratch")
            self.fresh_start()
            return False
        try:
            mstate, trainer, _ = C.read(folder)
        except C.CheckpointError as e:
            raise SystemExit(f"cannot resume: {e}") from None
        self.policy.load_state_dict(mstate)
        self.opt.load_state_dict(trainer["optimizer"])
        torch.set_rng_state(trainer["rng"])
        self.step, self.round, self.round_step = int(trainer["step"]), int(trainer["round"]), int(trainer["round_step"])
        mf = self.out / "metrics.jsonl"
        if self.d.main and mf.is_file():  # keep what happened up to the checkpoint (its round's data record included)
            recs = [json.loads(x) for x in mf.read_text().splitlines() if x.strip()]
            keep = [x for x in recs if x["step"] < self.step or (x["step"] == self.step and self._before(x))]
            mf.write_text("".join(json.dumps(x) + "\n" for x in keep))
            self.history = [x for x in keep if x["kind"] == "eval"]
        self.log(f"resumed from {folder}: step {self.step}, round {self.round}, step {self.round_step} of the round")
        self.d.barrier()
        return True

    def _before(self, rec: dict) -> bool:
        """Whether a record written at the checkpoint's step came before the checkpoint (the train record of the
        step, the evaluation of a finished round, the data record of the round in progress) or after it."""
        if rec["kind"] == "generate":
            return rec["round"] < self.round or (rec["round"] == self.round and self.round_step > 0)
        return rec["kind"] == "train" or rec["round"] <= self.round

    def fresh_start(self) -> None:
        """Without --resume: forget an earlier run's round data and metrics in this output folder."""
        if self.d.main:
            for p in list(self.rdir.glob("*.json")) + [self.out / "metrics.jsonl"]:
                p.unlink(missing_ok=True)
        self.d.barrier()

    # ------------------------------------------------------------------------------------------- the run
    def run(self) -> dict:
        cfg = self.cfg
        if not self.resume():
            self.evaluate(0)
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.rounds, initial=self.round, disable=not (self.d.main and cfg.progress), unit="round",
                   desc=self.alg.name, dynamic_ncols=True)
        while self.round < cfg.rounds:
            r = self.round
            data = self.round_data(r)
            if self.round_step == 0 and cfg.restart_optimizer and not self.alg.online:
                (self.opt.base if isinstance(self.opt, ExtraGradient) else self.opt).state.clear()
            if self.round_step == 0:
                self.write(self.round_record(r, data))
            items = data["items"]
            n_steps = self.steps_in_round(len(items))
            while self.round_step < n_steps:
                self.write(self.train_step(r, items))
                if cfg.save_every and self.step % cfg.save_every == 0 and self.round_step < n_steps:
                    self.save()
            self.round, self.round_step = r + 1, 0
            if self.round % cfg.eval_every == 0 or self.round == cfg.rounds:
                self.evaluate(self.round)
                self.save()
            bar.update(1)
            last = self.history[-1] if self.history else {}
            if "eval/greedy_accuracy" in last:
                bar.set_postfix({"acc": f"{last['eval/greedy_accuracy']:.3f}"}, refresh=False)
        bar.close()
        return self.finish()

    def finish(self) -> dict:
        cfg, d = self.cfg, self.d
        hist = {x["round"]: x for x in self.history}
        rounds = sorted(hist)
        per = lambda k: [hist[r].get(k) for r in rounds]  # noqa: E731
        acc, digit = per("eval/greedy_accuracy"), per("eval/greedy_digit_accuracy")
        points = lambda v: round(100 * (v[-1] - v[0]), 2) if v and v[0] is not None else None  # noqa: E731
        summary = {
            "algorithm": self.alg.name, "description": self.alg.describe(cfg.rounds, cfg.hparams()), "rounds": cfg.rounds,
            "evaluated_rounds": rounds,
            "greedy_accuracy_per_round": acc, "greedy_digit_accuracy_per_round": digit,
            "start_greedy_accuracy": acc[0] if acc else None, "final_greedy_accuracy": acc[-1] if acc else None,
            "improvement_points": points(acc),
            "start_greedy_digit_accuracy": digit[0] if digit else None,
            "final_greedy_digit_accuracy": digit[-1] if digit else None, "digit_improvement_points": points(digit),
            "winrate_vs_start_per_round": per("eval/winrate_vs_start"), "kl_to_ref_per_round": per("eval/kl_to_ref"),
            "judge_score_per_round": per("eval/judge_score"), "length_per_round": per("eval/length"),
            "train_steps": self.step, "sft_steps": cfg.sft_steps if cfg.model is None and cfg.synthetic else 0,
            "hparams": cfg.hparams(), "judge": self.judge.name, "world_size": d.world,
            "wall_seconds": round(time.time() - self.t0, 2), "final_model": str(self.out / "final"),
        }
        if d.main:
            final = self.out / "final"
            self.policy.save_pretrained(str(final), safe_serialization=True)
            self.tok.save_pretrained(str(final))
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
            if cfg.plots:
                from .plots import plot

                plot(self.out / "metrics.jsonl", self.out)
            self.log(table(summary))
        d.barrier()
        return summary


def lr_factor(schedule: str, step: int, total: int, warmup: float) -> float:
    """The learning-rate multiplier at ``step`` of ``total``: 1 (``constant``), or ``linear``: a linear warm-up
    over the first ``warmup`` fraction of the steps, then a linear decay to 0 (Hugging Face's linear schedule)."""
    if schedule == "constant" or total <= 0:
        return 1.0
    w = int(warmup * total)
    return (step + 1) / w if step < w else max(0.0, (total - step) / max(1, total - w))


def table(s: dict) -> str:
    f = lambda v: "n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    rows = [("algorithm", s["description"]),
            ("greedy exact match per round", ", ".join(map(f, s["greedy_accuracy_per_round"]))),
            ("greedy per-digit per round", ", ".join(map(f, s["greedy_digit_accuracy_per_round"]))),
            ("win-rate vs start", ", ".join(map(f, s["winrate_vs_start_per_round"]))),
            ("KL to reference / token", ", ".join(map(f, s["kl_to_ref_per_round"]))),
            ("steps", f"{s['train_steps']} (after {s['sft_steps']} SFT warm-up steps)"),
            ("wall time", f"{s['wall_seconds']:.1f} s"), ("final model", s["final_model"])]
    w = max(len(k) for k, _ in rows)
    return "\n".join(["", "fastpref train --online: summary", "-" * (w + 40)] + [f"{k:<{w}}  {v}" for k, v in rows])


def train(cfg: OnlineConfig) -> dict:
    """Run the online mode with this configuration; returns the summary (also in summary.json)."""
    cfg = cfg.resolved()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    d = setup("ddp" if cfg.distributed == "ddp" else "none", cfg.device)
    try:
        torch.manual_seed(cfg.seed)
        return OnlineRun(cfg, d).run()
    finally:
        d.close()
