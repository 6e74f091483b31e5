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
import time

import torch

from ..dist import Dist
from ..evaluate import mean_scores
from ..folder import claimed
from ..generate import generate
from ..model import disable_dropout, frozen_copy, load_model
from ..run import Core, launch
from ..synthetic import verify
from . import algorithms as A
from .config import OnlineConfig
from .extragradient import ExtraGradient
from .judges import JudgeError, Judge, make_judge
from .logps import mean_token_kl
from .rounds import Rounds
from .setup import load_prompts, starting_policy

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class OnlineRun(Rounds, Core):
    """One online run: rounds of generate → judge → train (:class:`Rounds`), evaluation, checkpoints, summary."""

    task = "online"

    def __init__(self, cfg: OnlineConfig, d: Dist):
        super().__init__(cfg, d)
        self.alg = A.get(cfg.algorithm)
        self.rdir = self.out.folder / "rounds"
        if d.main:
            self.out.own(self.rdir)
            self.rdir.mkdir(parents=True, exist_ok=True)
        d.barrier()
        self.eos_id = self.tok.eos_token_id
        try:
            self.judge: Judge = make_judge(cfg.judge, synthetic=cfg.synthetic, temperature=cfg.judge_temperature,
                                           device=d.device, timeout=cfg.judge_timeout)
        except JudgeError as e:
            raise SystemExit(str(e)) from None
        self.train_prompts, self.eval_prompts, self.teachers = load_prompts(cfg, self.tok, self.alg.teacher)
        self.past_items: dict[int, list[A.Item]] = {}  # earlier rounds' items, for an accumulating algorithm
        self.policy = starting_policy(cfg, self.tok, self.out, d).to(d.device).train()
        # dropout off in the policy and the reference (as TRL's online trainers) unless --keep-dropout; the saved
        # model keeps its config's rates
        self.restore_dropout = (lambda: None) if cfg.keep_dropout else disable_dropout(self.policy)
        ref = load_model(cfg.ref_model) if cfg.ref_model else frozen_copy(self.policy)
        dtype = DTYPES.get(cfg.ref_dtype or "", next(self.policy.parameters()).dtype)
        self.ref = frozen_copy(ref).to(d.device, dtype)
        if not cfg.keep_dropout:
            disable_dropout(self.ref)
        self.loss = A.ItemLoss(self.alg.loss, cfg.hparams(), pad_id=self.pad_id, backend=cfg.backend)
        params = [p for p in self.policy.parameters() if p.requires_grad]
        self.params = params
        base = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.opt = ExtraGradient(base) if cfg.extragradient else base
        self.step = self.round = self.round_step = 0
        self.history: list[dict] = []

    # ------------------------------------------------------------------------------------------- evaluation
    def _answers(self, model: torch.nn.Module) -> list[list[int]]:
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
                self.out.write_json(start_file, texts, wait=False)
            start = json.loads(start_file.read_text())
            try:  # the judge's answers, under the same one-line rule as in the rounds
                rec["eval/winrate_vs_start"] = sum(self.judge.prefer(prompts, texts, start)) / len(texts)
                rewards = self.judge.rewards(prompts, texts)
            except JudgeError as e:
                raise SystemExit(f"judge failed: {e}") from None
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
            self.out.record(rec)
        self.d.barrier()
        return rec

    # ------------------------------------------------------------------------------------------- checkpoints
    def save(self) -> None:
        state = {k: v.detach().cpu().clone() for k, v in self.policy.state_dict().items()}
        trainer = {"step": self.step, "round": self.round, "round_step": self.round_step,
                   "optimizer": self.opt.state_dict(), "rng": torch.get_rng_state(), "world": self.d.world}
        self.out.save_checkpoint(self.step, state, trainer, {"step": self.step, "round": self.round,
                                                              "round_step": self.round_step,
                                                              "algorithm": self.alg.name})

    def resume(self) -> bool:
        found = self.out.open_checkpoint(self.cfg.resume)
        if found is None:
            self.fresh_start()
            return False
        folder, mstate, trainer = found
        self.policy.load_state_dict(mstate)
        self.opt.load_state_dict(trainer["optimizer"])
        torch.set_rng_state(trainer["rng"])
        self.step, self.round, self.round_step = int(trainer["step"]), int(trainer["round"]), int(trainer["round_step"])
        # keep what happened up to the checkpoint (its round's data record included)
        keep = self.out.keep_records(lambda x: x["step"] < self.step or (x["step"] == self.step and self._before(x)))
        if self.d.main:
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
            for p in self.rdir.glob("*.json"):
                p.unlink(missing_ok=True)
        self.out.forget_records()
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
            items = self.training_items(r, data)
            if self.round_step == 0:
                self.out.record(self.round_record(r, data, len(items)))
            n_steps = self.steps_in_round(len(items))
            while self.round_step < n_steps:
                self.out.record(self.train_step(r, items))
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
        """Save the final model, the summary and the plots; returns the summary."""
        from .plots import plot

        summary = summarize(self)
        self.restore_dropout()
        self.out.save_final(self.policy, self.tok)
        self.out.save_summary(summary, plot if self.cfg.plots else None)
        self.log(table(summary))
        self.d.barrier()
        return summary


def summarize(run: OnlineRun) -> dict:
    """summary.json of an online run: the held-out evaluations per round, the set-up."""
    cfg = run.cfg
    hist = {x["round"]: x for x in run.history}
    rounds = sorted(hist)
    per = lambda k: [hist[r].get(k) for r in rounds]  # noqa: E731
    acc, digit = per("eval/greedy_accuracy"), per("eval/greedy_digit_accuracy")
    points = lambda v: round(100 * (v[-1] - v[0]), 2) if v and v[0] is not None else None  # noqa: E731
    return {
        "algorithm": run.alg.name, "description": run.alg.describe(cfg.rounds, cfg.hparams()), "rounds": cfg.rounds,
        "evaluated_rounds": rounds,
        "greedy_accuracy_per_round": acc, "greedy_digit_accuracy_per_round": digit,
        "start_greedy_accuracy": acc[0] if acc else None, "final_greedy_accuracy": acc[-1] if acc else None,
        "improvement_points": points(acc),
        "start_greedy_digit_accuracy": digit[0] if digit else None,
        "final_greedy_digit_accuracy": digit[-1] if digit else None, "digit_improvement_points": points(digit),
        "winrate_vs_start_per_round": per("eval/winrate_vs_start"), "kl_to_ref_per_round": per("eval/kl_to_ref"),
        "judge_score_per_round": per("eval/judge_score"), "length_per_round": per("eval/length"),
        "train_steps": run.step, "sft_steps": cfg.sft_steps if cfg.model is None and cfg.synthetic else 0,
        "hparams": cfg.hparams(), "judge": run.judge.name, "world_size": run.d.world,
        "wall_seconds": round(time.time() - run.t0, 2), "final_model": str(run.out.folder / "final"),
    }


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

    def body(d: Dist) -> dict:
        torch.manual_seed(cfg.seed)
        return OnlineRun(cfg, d).run()

    with claimed(cfg, OnlineRun.task):
        return launch(body, threads=cfg.threads, distributed="ddp" if cfg.distributed == "ddp" else "none",
                      device=cfg.device)
