"""The preference task (offline training, ``fastpref train``): SFT warm-up on the preferred answers, then
preference training against a frozen reference; evaluation on held-out prompts (greedy answers scored by the
task's verifier, reward and ranking accuracy), and the summary. What a batch is: rows of a preference data
set (pairs, lists or unpaired); the loss: a :class:`~fastpref.nn.PreferenceLoss` mix. Steps, checkpoints and
resume come from :class:`~fastpref.train.phases.PhasedRun`; the reference from :class:`References`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..nn import PreferenceLoss
from . import data as D
from .config import Config
from .dist import Dist, load_model_state, wrap
from .folder import claimed
from .model import decoder, enable_gradient_checkpointing, final_softcap, load_model, tiny_model, use_packing
from .objective import Objective, call, dataset_logps, dry_run, loss_inputs, make_loss, metrics, needs_kto_kl
from .phases import PhasedRun
from .references import References
from .run import Phase, environment, launch, sft_micro_step
from .unpaired import kto_kl


@dataclass
class PreferenceData:
    """The data of a preference run: training rows, SFT rows, held-out rows (or None), and the held-out prompts
    with the verifier that scores greedy answers to them (None / [] without one)."""

    train: D.Dataset
    sft: D.Dataset
    eval: D.Dataset | None
    verifier: Callable | None = None
    eval_prompts: list = field(default_factory=list)


def load_data(cfg: Config, tok, log: Callable[[str], None]) -> PreferenceData:
    """The synthetic task (demonstrations for SFT, verifier), or --data (and --eval-data, or a held-out split)."""
    tk = D.Tokenize(tok, cfg.max_length, cfg.max_prompt_length, cfg.truncation)
    if cfg.synthetic:
        from .synthetic import demonstrations, make_task, verify

        rows, held = make_task(cfg.synthetic_train, cfg.synthetic_eval)
        data = PreferenceData(D.load_dataset(rows, tk, source="synthetic-train"),
                              D.load_dataset(demonstrations(rows, seed=cfg.seed), tk, source="synthetic-demonstrations"),
                              D.load_dataset(held, tk, source="synthetic-heldout"), verify, [r["prompt"] for r in held])
    else:
        full = D.load_dataset(cfg.data, tk, skip_bad_rows=cfg.skip_bad_rows)
        if cfg.eval_data:
            held = D.load_dataset(cfg.eval_data, tk, layout=full.layout, skip_bad_rows=cfg.skip_bad_rows)
        else:
            full, held = D.split_by_prompt(full, cfg.eval_fraction)
        data = PreferenceData(full, full, held, None, [])  # SFT warm-up on the preferred answers
        for ds in (data.train, data.eval):
            if ds is not None and ds.skipped:
                log(f"{ds.source}: skipped {sum(ds.skipped.values())} bad rows: " +
                    "; ".join(f"{n}× {r}" for r, n in ds.skipped.most_common()))
        if data.train.truncated:
            log(f"{data.train.source}: {data.train.truncated} rows truncated to --max-length "
                f"{cfg.max_length} (completion end cut)")
    if data.eval is None:
        log("warning: no held-out rows (set --eval-data or --eval-fraction); evaluation is skipped")
    return data


def check_loss(cfg: Config, loss: PreferenceLoss, train: D.Dataset, ref_mode: str) -> None:
    """Refuse (SystemExit, one line) a loss that cannot train on this data: a dry run of the loss with the
    inputs the data and the other models provide, and KTO's batch-size need."""
    ex0 = train.examples[0]
    provided = set(ex0.numbers) | set(ex0.texts) | \
        {name for name in ("prev_model", "token_reward_model") if getattr(cfg, name)}
    dry_run(loss, train.layout, train.num_responses, ref_mode, provided)
    if needs_kto_kl(loss) and cfg.batch_size < 2:
        raise SystemExit("KTO's reference point pairs each prompt with another completion of its micro-batch: "
                         "use --batch-size >= 2 (or --loss-args kl=0)")


class PreferenceRun(References, PhasedRun):
    """One preference training run: the phases "sft" and "pref" of one policy."""

    task = "preference"

    def __init__(self, cfg: Config, d: Dist):
        super().__init__(cfg, d)
        torch.manual_seed(cfg.seed)
        data = load_data(cfg, self.tok, self.log)  # data errors and a loss the data cannot feed: before the model
        self.train, self.sft_data, self.eval = data.train, data.sft, data.eval
        self.verifier, self.eval_prompts = data.verifier, data.eval_prompts
        self.loss = self.make_loss(None)
        self.ref_mode = self._ref_mode()
        check_loss(cfg, self.loss, self.train, self.ref_mode)
        self.policy = self.make_model().to(d.device)
        self.softcap = final_softcap(self.policy)
        if self.softcap is not None:
            self.loss = self.make_loss(self.softcap)
        self.packed = use_packing(self.policy, cfg.packing, self.log)
        self.pack_length = cfg.pack_length if cfg.pack_length is not None else cfg.max_length
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(self.policy)
        self.objective = Objective(self.policy, self.loss, self.softcap, cfg.backend)
        self.module = wrap(self.objective, list(getattr(decoder(self.policy), "layers", [])), d)
        self.sft_steps = cfg.sft_steps
        self.pref_steps = cfg.steps if cfg.steps is not None else \
            max(1, math.ceil(cfg.epochs * len(self.train) / (cfg.batch_size * d.world * cfg.grad_accum)))
        self.phases = [Phase("sft", 0, self.sft_steps, cfg.sft_lr, cfg.warmup_ratio, cfg.min_lr_ratio),
                       Phase("pref", self.sft_steps, self.pref_steps, cfg.lr, cfg.warmup_ratio, cfg.min_lr_ratio)]
        self.ref = self.ref_train = self.ref_eval = self.prev_train = self.token_rm = None
        self.before: dict | None = None

    def make_loss(self, softcap: float | None) -> PreferenceLoss:
        """The loss of ``--loss`` for the training data's layout, with the policy's final logit ``softcap``."""
        return make_loss(self.cfg.loss_weights(), self.cfg.loss_hparams(), self.train.layout,
                         self.train.num_responses, softcap, self.cfg.backend)

    def make_model(self) -> nn.Module:
        """A fresh policy (the tiny demo model or --model), without disturbing the global RNG."""
        with torch.random.fork_rng(devices=[]):
            model = tiny_model(len(self.tok), self.cfg.seed) if self.cfg.model is None else load_model(self.cfg.model)
        return model.train()

    # ------------------------------------------------------------------------------------------- phase hooks
    def module_for(self, phase: Phase) -> nn.Module:
        return self.module

    def begin(self, phase: Phase) -> None:
        if phase.name == "sft" and self.step == 0:
            self.evaluate("sft")  # the untrained model's greedy answers
        if phase.name == "pref":
            self.setup_reference()
            self.setup_other_models()
            if self.step == phase.start:
                self.before = self.evaluate()

    def describe(self, phase: Phase) -> str:
        return phase.name if phase.name == "sft" else ",".join(self.loss.fns)

    def trained(self) -> nn.Module:
        return self.objective

    def load_model_state(self, state: dict, phase: str) -> None:
        load_model_state(self.objective, {f"model.{k}": v for k, v in state.items()}, self.d)

    def extra_state(self) -> dict:
        return {"loss_state": {k: getattr(self.loss, k).cpu() for k in ("delta_mean", "delta_count")}}

    def load_extra_state(self, trainer: dict) -> None:
        for k, v in trainer.get("loss_state", {}).items():  # running statistics of the loss (BCO's δ)
            getattr(self.loss, k).copy_(v)

    def evaluate_now(self, phase: Phase) -> None:
        self.evaluate(phase.name)

    def chunk(self, phase: Phase, step: int, micro: int) -> list[int]:
        """The examples of one micro-batch across all ranks: a pure function of (seed, phase, step, micro)."""
        cfg, n = self.cfg, self.cfg.batch_size * self.d.world
        pos = ((step - phase.start) * cfg.grad_accum + micro) * n
        data = self.sft_data if phase.name == "sft" else self.train
        return D.order(len(data), cfg.seed + (0 if phase.name == "sft" else 7919), pos, n)

    def micro_step(self, phase: Phase, step: int, micro: int) -> dict:
        cfg, d = self.cfg, self.d
        chunk = self.chunk(phase, step, micro)
        idx = chunk[d.rank * cfg.batch_size:(d.rank + 1) * cfg.batch_size]
        if phase.name == "sft":
            return sft_micro_step(self.module, self.sft_data, chunk, idx, d=d, packed=self.packed, pad_id=self.pad_id,
                                  pack_length=self.pack_length, grad_accum=cfg.grad_accum, autocast=self.autocast)
        b = D.batch(self.train, idx, packed=self.packed, pad_id=self.pad_id, pack_length=self.pack_length,
                    sequence_labels=self.loss.nll_tokens == "sequence").to(d.device)
        ref = self.ref_inputs(b, idx)
        inputs = loss_inputs(self.loss, self.train.layout, b.inputs)
        others, scored = self.other_inputs(b, idx)
        inputs.update(others)
        if needs_kto_kl(self.loss):
            inputs["kl"] = kto_kl(self.module, self.ref_obj, self.train, idx, max_length=cfg.max_length, d=d,
                                  device=d.device, autocast=self.autocast, packed=self.packed, pad_id=self.pad_id,
                                  pack_length=self.pack_length)
        with self.autocast():
            out = call(self.module, b, mode="pref", ref=ref, inputs=inputs, scored=scored)
        (out["loss"] / cfg.grad_accum).backward()
        return {"loss": float(out["loss"].detach()), **out["metrics"]}

    # ------------------------------------------------------------------------------------------- evaluation
    def greedy(self) -> dict:
        """The verifier's mean scores of the policy's greedy answers to the held-out prompts ({} without one)."""
        if self.verifier is None or self.d.mode == "fsdp":  # FSDP: the sharded policy runs only inside Objective
            return {}
        from .evaluate import greedy_scores

        with self.autocast():
            scores = greedy_scores(self.policy, self.tok, self.eval_prompts, self.verifier,
                                   batch_size=self.cfg.eval_batch_size, max_new_tokens=self.cfg.max_length)
        return {f"eval/greedy_{k}": v for k, v in scores.items()}

    def evaluate(self, phase: str = "pref") -> dict | None:
        """Held-out metrics: greedy-answer scores, and (preference phase) reward / ranking accuracy."""
        if phase == "sft":
            scores = self.greedy()
            rec = {"step": self.step, "eval": True, "phase": "sft", **scores} if scores else None
        elif self.eval is None:
            return None
        else:
            pol = dataset_logps(self.module, self.eval, packed=self.packed, pad_id=self.pad_id,
                                batch_size=self.cfg.eval_batch_size, d=self.d, device=self.d.device,
                                autocast=self.autocast, pack_length=self.pack_length)
            m = metrics(self.eval, pol, self.ref_eval if self.loss.needs_ref else None, self.loss.beta)
            rec = {"step": self.step, "eval": True, "phase": "pref", **{f"eval/{k}": v for k, v in m.items()},
                   **self.greedy()}
        if rec is not None:
            self.out.record(rec)
        return rec

    # ------------------------------------------------------------------------------------------- the run
    def run(self) -> dict:
        self.prepare_output()
        last = self.train_phases(self.resume())
        if self.pref_steps > 0 and self.ref is None and self.ref_mode != "none":
            self.setup_reference()  # resumed from the final checkpoint
        final = self.evaluate() if self.pref_steps > 0 else None
        if last is not None:
            self.save(*last)
        return self.finish(final)

    def finish(self, final: dict | None) -> dict:
        """Save the final model, the summary and the plots; returns the summary."""
        from .plots import plot, table

        state = self.model_state()
        before = self.before or self.out.find_record(  # after a resume: the evaluation as preference training began
            lambda r: r.get("eval") and r.get("phase") == "pref" and r["step"] == self.sft_steps)
        summary = summarize(self, before, final)
        self.out.save_final(self.make_model() if self.d.mode == "fsdp" else self.policy, self.tok, state)
        self.out.save_summary(summary, plot if self.cfg.plots else None)
        if self.d.main:
            print(table(summary))
        self.d.barrier()
        return summary


def summarize(run: PreferenceRun, before: dict | None, final: dict | None) -> dict:
    """summary.json of a preference run: held-out results before and after preference training, the set-up."""
    cfg, d = run.cfg, run.d
    greedy = lambda rec: {k[len("eval/greedy_"):]: v for k, v in (rec or {}).items()  # noqa: E731
                          if k.startswith("eval/greedy_")} or None
    return {
        "eval_greedy_before": greedy(before), "eval_greedy_after": greedy(final),
        "eval_reward_accuracy": final and final.get("eval/reward_accuracy"),
        "eval_ranking_accuracy": final and final.get("eval/ranking_accuracy"),
        "eval_margin": final and final.get("eval/margin"),
        "eval_before": {k: v for k, v in (before or {}).items() if k.startswith("eval/")},
        "train_steps": run.step, "sft_steps": run.sft_steps, "preference_steps": run.pref_steps,
        "wall_seconds": round(time.time() - run.t0, 2), "loss": run.loss.weights,
        "hparams": {**run.loss.hparams, **({"delta": "running"} if run.loss.running_delta else {})},
        "layout": run.train.layout, "train_examples": len(run.train),
        "eval_examples": len(run.eval) if run.eval else 0, "packed": run.packed,
        "ref_mode": run.ref_mode, "distributed": d.mode, "world_size": d.world,
        "skipped_rows": sum(run.train.skipped.values()), "truncated_rows": run.train.truncated,
        "final_model": str(run.out.folder / "final"), "data": cfg.data or "synthetic",
        **environment(cfg.backend, d.device),
    }


def train(cfg: Config) -> dict:
    """Run preference training with this configuration; returns the summary (also written to summary.json)."""
    cfg = cfg.resolved()
    with claimed(cfg, PreferenceRun.task):
        return launch(lambda d: PreferenceRun(cfg, d).run(), threads=cfg.threads, distributed=cfg.distributed,
                      device=cfg.device)
