"""Reward-model training: ``fastpref train --task reward``.

A sequence classifier (``AutoModelForSequenceClassification``: a causal LM's body with a linear ``score`` head
on the last non-padding token) fitted with a reward loss of the registry:

* pairwise rows ``{prompt, chosen, rejected}`` (optional ``margin``, ``strength``): ``bt`` (margin, label
  smoothing, reward centering), ``scaled_bt`` (needs ``strength``), ``gpm`` (a 2·heads-dimensional embedding,
  L2-normalised), ``micro`` (heads rewards and heads router logits; the router is the mean of the pair's);
* score rows ``{prompt, response, scores}`` (``scores``: a list, or a mapping attribute → value; or
  HelpSteer2's attribute columns): ``regression`` (one output per attribute).

Held-out reward accuracy: the fraction of held-out pairs the model orders right (score rows: pairs of
responses to one prompt with different mean scores). The final model loads with
``AutoModelForSequenceClassification.from_pretrained``. Single process. The run (:class:`RewardRun`) is a
:class:`~fastpref.train.phases.PhasedRun`: the SFT phase (pairwise data; a causal LM on the chosen answers, a
constant learning rate), then the reward phase; checkpoints and exact resume in either.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import losses as L
from ..nn import PreferenceLoss, loss_params
from . import data as D
from .config import REAL_DEFAULTS, SYNTHETIC_DEFAULTS, Config
from .dist import Dist
from .fields import check_values, source
from .folder import claimed
from .model import load_model, tiny_model
from .objective import Objective
from .phases import PhasedRun
from .run import Phase, launch, sft_micro_step

LOSSES = ("bt", "scaled_bt", "regression", "gpm", "micro")
HELPSTEER = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
# The embedded default (the synthetic task): reaches held-out reward accuracy >= 0.9 on 2 CPU cores.
SYNTHETIC = dict(SYNTHETIC_DEFAULTS, sft_steps=500, steps=1000, batch_size=32, lr=1e-3, eval_every=250)
SYNTHETIC_TRAIN = 10_000  # the reward model overfits 2000 pairs
REAL = dict(REAL_DEFAULTS, lr=1e-5)


def _resolved(cfg: Config) -> Config:
    base = SYNTHETIC if cfg.synthetic else REAL
    return dataclasses.replace(cfg, **{k: v for k, v in base.items() if k in
                                       {f.name for f in dataclasses.fields(Config)} and getattr(cfg, k) is None})


# ------------------------------------------------------------------------------------------------------ data
def _score_rows(rows, tk: D.Tokenize, where_prefix: str) -> tuple[list[D.Example], list[str]]:
    """Score rows → examples with one sequence and ``numbers["targets"]`` (attribute order: first row's)."""
    examples, attrs = [], None
    for where, row in rows:
        if isinstance(row, D.DataError):
            raise row
        if not isinstance(row, dict):
            raise D.DataError(f"{where}: a row must be a JSON object")
        key = "response" if "response" in row else "completion"
        prompt, resp = D._text_or_messages(row, "prompt", where), D._text_or_messages(row, key, where)
        sc = row.get("scores", row.get("score"))
        if sc is None and any(a in row for a in HELPSTEER):
            sc = {a: row[a] for a in HELPSTEER if a in row}
        if isinstance(sc, (int, float)) and not isinstance(sc, bool):
            sc = [sc]
        if isinstance(sc, dict):
            names = list(sc)
            sc = [sc[a] for a in (attrs or names)] if set(names) == set(attrs or names) else None
            attrs = attrs or names
        if not isinstance(sc, list) or not sc or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                         and math.isfinite(x) for x in sc):
            raise D.DataError(f"{where}: score rows need 'scores' (a list of numbers, or the same attribute → "
                              f"number mapping in every row), 'score', or HelpSteer2's {list(HELPSTEER)}")
        check_values("scores", "scores" if "scores" in row else "score", sc, where, D.DataError)  # float32
        attrs = attrs or [f"score_{i}" for i in range(len(sc))]
        if len(sc) != len(attrs):
            raise D.DataError(f"{where}: {len(sc)} scores, but earlier rows have {len(attrs)}")
        p, c, _ = tk.ids(prompt, resp, where)
        examples.append(D.Example([(p, c)], prompt_key=json.dumps(prompt), numbers={"targets": [float(x) for x in sc]}))
    if not examples:
        raise D.DataError(f"{where_prefix}: no usable rows")
    return examples, attrs


def load(cfg: Config, tok) -> tuple[D.Dataset, D.Dataset | None, list[str] | None]:
    """(train, held-out, attribute names or None for pairwise data)."""
    tk = D.Tokenize(tok, cfg.max_length, cfg.max_prompt_length, cfg.truncation)
    if cfg.synthetic:
        from .synthetic import make_task

        n = cfg.synthetic_train if cfg.synthetic_train != Config.synthetic_train else SYNTHETIC_TRAIN
        rows, held = make_task(n, cfg.synthetic_eval)
        return D.load_dataset(rows, tk, source="synthetic-train"), D.load_dataset(held, tk, source="synthetic"), None
    first = next(iter(D.read_rows(cfg.data)))[1]
    if isinstance(first, dict) and ("chosen" in first or "rejected" in first):
        full, attrs = D.load_dataset(cfg.data, tk, layout="pairs", skip_bad_rows=cfg.skip_bad_rows), None
        held = D.load_dataset(cfg.eval_data, tk, layout="pairs") if cfg.eval_data else None
    else:
        ex, attrs = _score_rows(D.read_rows(cfg.data), tk, str(cfg.data))
        full = D.Dataset("unpaired", ex, str(cfg.data))
        held = D.Dataset("unpaired", _score_rows(D.read_rows(cfg.eval_data), tk, cfg.eval_data)[0]) \
            if cfg.eval_data else None
    if held is None:  # held-out prompts: a deterministic split by prompt
        full, held = D.split_by_prompt(full, cfg.eval_fraction)
    return full, held, attrs


# ----------------------------------------------------------------------------------------------------- model
def outputs_for(loss: str, heads: int, attrs: list[str] | None) -> int:
    """Number of model outputs the loss reads."""
    return {"regression": len(attrs or [1]), "gpm": 2 * heads, "micro": 2 * heads}.get(loss, 1)


def make_model(cfg: Config, tok, num_labels: int, lm: nn.Module | None = None) -> nn.Module:
    """The reward model: the tiny demo classifier or --model (a causal LM folder gets a new score head; a
    classifier folder keeps its head when the output count matches); the body from ``lm`` when given."""
    from transformers import AutoModelForSequenceClassification

    if cfg.model is None:
        from .model import tiny_model

        model = tiny_model(len(tok), cfg.seed, num_labels=num_labels)
    elif lm is not None:
        model = AutoModelForSequenceClassification.from_config(lm.config, num_labels=num_labels)
    else:
        from .model import hub_kernel_args

        model = AutoModelForSequenceClassification.from_pretrained(
            cfg.model, num_labels=num_labels, local_files_only=True, use_safetensors=True,
            ignore_mismatched_sizes=True, dtype=torch.float32, **hub_kernel_args())
    if lm is not None:
        model.base_model.load_state_dict(lm.base_model.state_dict())
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return model


def forward(model: nn.Module, ds: D.Dataset, idx: list[int], pad_id: int, device) -> Tensor:
    """Model outputs [S, num_labels] (float32) for the sequences of examples ``idx`` of ``ds``, right-padded
    (pairs: the chosen sequences, then the rejected ones; score rows: one each)."""
    b = D.collate(D.sequences(ds, idx), packed=False, pad_id=pad_id).to(device)
    return model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.float()


# ------------------------------------------------------------------------------------------------------ loss
def loss_terms(loss: str, out: Tensor, B: int, heads: int, numbers: dict[str, Tensor]) -> tuple[dict, Tensor]:
    """(keyword inputs of the registry loss, per-pair preference score whose sign is the model's choice)."""
    if loss == "regression":
        return {"predictions": out, "targets": numbers["targets"]}, out.mean(-1)
    w, l = out[:B], out[B:]  # noqa: E741
    if loss == "gpm":
        w, l = nn.functional.normalize(w, dim=-1), nn.functional.normalize(l, dim=-1)
        return {"chosen_embeddings": w, "rejected_embeddings": l}, L.gpm_score(w, l)
    if loss == "micro":
        router = 0.5 * (w[:, heads:] + l[:, heads:])
        diff = (torch.softmax(router, -1) * (w[:, :heads] - l[:, :heads])).sum(-1)
        return {"chosen_rewards": w[:, :heads], "rejected_rewards": l[:, :heads], "router_logits": router}, diff
    kw = {"chosen_rewards": w[:, 0], "rejected_rewards": l[:, 0]}
    kw.update({k: v for k, v in numbers.items() if k in ("margin", "strength")})
    return kw, w[:, 0] - l[:, 0]


def _numbers(ds: D.Dataset, idx: list[int], device) -> dict[str, Tensor]:
    ex = [ds.examples[i] for i in idx]
    return {k: torch.tensor([e.numbers[k] for e in ex], dtype=torch.float32, device=device) for k in ex[0].numbers}


@torch.no_grad()
def evaluate(model: nn.Module, ds: D.Dataset, loss: str, heads: int, pad_id: int, device, batch_size: int) -> dict:
    """Held-out reward accuracy (ties count one half) and, for score rows, the mean squared error."""
    was = model.training
    model.eval()
    outs = []
    for i in range(0, len(ds), batch_size):
        idx = list(range(i, min(i + batch_size, len(ds))))
        out = forward(model, ds, idx, pad_id, device)
        outs.append(out if loss == "regression" else torch.stack([out[:len(idx)], out[len(idx):]], 1))
    model.train(was)
    out = torch.cat(outs)
    if loss != "regression":
        _, score = loss_terms(loss, torch.cat([out[:, 0], out[:, 1]]), len(ds), heads, {})
        return {"reward_accuracy": float(((score > 0).double() + 0.5 * (score == 0).double()).mean())}
    targets = torch.tensor([e.numbers["targets"] for e in ds.examples], device=out.device)
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(ds.examples):
        groups.setdefault(e.prompt_key, []).append(i)
    t_mean, p_mean = targets.mean(-1), out.mean(-1)
    right = total = 0.0
    for members in groups.values():
        for i, j in itertools.combinations(members, 2):
            if t_mean[i] != t_mean[j]:
                d = (p_mean[i] - p_mean[j]) * torch.sign(t_mean[i] - t_mean[j])
                right += float(d > 0) + 0.5 * float(d == 0)
                total += 1
    return {"reward_accuracy": right / total if total else None, "mse": float(((out - targets) ** 2).mean())}


# ----------------------------------------------------------------------------------------------------- train
def reward_loss(cfg: Config) -> tuple[str, dict, int]:
    """(the loss name, its keyword arguments, ``heads``) of ``--loss`` / ``--loss-args``, checked."""
    weights = cfg.loss_weights()
    if len(weights) != 1 or next(iter(weights)) not in LOSSES:
        raise SystemExit(f"--task reward takes one of --loss {', '.join(LOSSES)}, got {','.join(weights)}")
    loss = next(iter(weights))
    hp = cfg.loss_hparams()
    hp.pop("beta", None)
    heads = int(hp.pop("heads", 2))
    bad = sorted(set(hp) - loss_params(L.get(loss)))
    if bad:
        raise SystemExit(f"--loss-args {bad} are not taken by {loss} (reward-model keys: heads)")
    return loss, hp, heads


class RewardRun(PhasedRun):
    """One reward-model run: the phase "sft" (a causal LM on the preferred answers; pairwise data only), then
    "reward" (the classifier, its body from that LM). Its metrics count steps from the reward phase's start."""

    task = "reward"

    def __init__(self, cfg: Config, d: Dist):
        self.loss, self.hp, self.heads = reward_loss(cfg)
        self.fn = L.get(self.loss)
        torch.manual_seed(cfg.seed)
        super().__init__(cfg, d)
        self.train, self.held, self.attrs = load(cfg, self.tok)
        if (self.loss == "regression") != (self.attrs is not None):
            want = "score rows {prompt, response, scores}" if self.loss == "regression" else \
                "pairwise rows {prompt, chosen, rejected}"
            raise SystemExit(f"--loss {self.loss} needs {want} (got {'score' if self.attrs else 'pairwise'} rows)")
        if self.loss == "scaled_bt" and "strength" not in self.train.examples[0].numbers:
            raise SystemExit(f"--loss scaled_bt needs the preference strength: {source('strength')}")
        sft = cfg.sft_steps if self.attrs is None else 0
        steps = cfg.steps or max(1, math.ceil(cfg.epochs * len(self.train) / cfg.batch_size))
        self.phases = [Phase("sft", 0, sft, cfg.sft_lr, 0.0, 1.0),  # a constant SFT learning rate
                       Phase("reward", sft, steps, cfg.lr, cfg.warmup_ratio, cfg.min_lr_ratio)]
        self.lm: Objective | None = None  # the SFT phase's causal LM (inside the SFT objective)
        self.model: nn.Module | None = None  # the reward model
        self.resumed_phase: str | None = None
        self.before: dict | None = None

    # ------------------------------------------------------------------------------------------- models
    def make_lm(self) -> Objective:
        """The SFT phase's causal LM (the demo model or --model) inside an SFT-only objective."""
        cfg = self.cfg
        lm = tiny_model(len(self.tok), cfg.seed) if cfg.model is None else load_model(cfg.model)
        return Objective(lm.to(self.d.device).train(), PreferenceLoss("sft"), backend=cfg.backend)

    def make_reward_model(self) -> nn.Module:
        """The reward model, its body from the SFT phase's LM when there was one (which is then let go)."""
        lm = self.lm.model if self.lm is not None else None
        model = make_model(self.cfg, self.tok, outputs_for(self.loss, self.heads, self.attrs), lm)
        self.lm = None
        return model.to(self.d.device).train()

    # ------------------------------------------------------------------------------------------- phase hooks
    def module_for(self, phase: Phase) -> nn.Module:
        if phase.name == "sft":
            if self.lm is None:
                self.lm = self.make_lm()
            return self.lm
        if self.model is None:
            self.model = self.make_reward_model()
        return self.model

    def begin(self, phase: Phase) -> None:
        if phase.name == "reward" and self.step == phase.start:
            self.before = self.evaluate()

    def trained(self) -> nn.Module:
        return self.model if self.model is not None else self.lm

    def load_model_state(self, state: dict, phase: str) -> None:
        self.resumed_phase = phase
        if phase == "sft":
            self.lm = self.make_lm()
            self.lm.model.load_state_dict(state)
        else:
            self.model = self.make_reward_model()
            self.model.load_state_dict(state)

    def keep_record(self, rec: dict) -> bool:
        return self.resumed_phase == "reward" and rec["step"] <= self.step - self.phases[1].start

    def micro_step(self, phase: Phase, step: int, micro: int) -> dict:
        cfg, bs = self.cfg, self.cfg.batch_size
        pos = ((step - phase.start) * cfg.grad_accum + micro) * bs
        if phase.name == "sft":
            idx = D.order(len(self.train), cfg.seed + 1, pos, bs)
            return sft_micro_step(self.lm, self.train, idx, idx, d=self.d, packed=False, pad_id=self.pad_id,
                                  pack_length=0, grad_accum=cfg.grad_accum, autocast=self.autocast)
        idx = D.order(len(self.train), cfg.seed, pos, bs)
        out = forward(self.model, self.train, idx, self.pad_id, self.d.device)
        kw, score = loss_terms(self.loss, out, len(idx), self.heads, _numbers(self.train, idx, self.d.device))
        value = self.fn(**kw, **self.hp).mean()
        (value / cfg.grad_accum).backward()
        return {"loss": float(value.detach()), "accuracy": float((score > 0).float().mean())}

    def count_from(self, phase: Phase) -> int:
        return phase.start

    def record(self, phase: Phase, rec: dict) -> dict | None:
        k = self.step - phase.start
        if phase.name == "sft" or not (k % max(self.cfg.log_every, 1) == 0 or k == 1 or self.step == phase.end):
            return None
        return {"step": k, **{key: rec[key] for key in ("loss", "accuracy", "grad_norm", "time")}}

    def evaluate_now(self, phase: Phase) -> None:
        if phase.name == "reward":
            self.evaluate()

    def evaluate(self) -> dict | None:
        """Held-out reward accuracy (and mse), recorded at the reward phase's step count; None without rows."""
        if self.held is None:
            return None
        m = evaluate(self.model, self.held, self.loss, self.heads, self.pad_id, self.d.device,
                     self.cfg.eval_batch_size)
        self.out.record({"step": self.step - self.phases[1].start, "eval": True,
                         **{f"eval/{k}": v for k, v in m.items()}})
        return m

    # ------------------------------------------------------------------------------------------- the run
    def run(self) -> dict:
        self.prepare_output()
        last = self.train_phases(self.resume())
        if self.model is None:  # resumed from the SFT phase's final checkpoint with no reward step to run
            self.model = self.make_reward_model()
        final = self.evaluate()
        if last is not None:
            self.save(*last)
        before = self.before
        if before is None:  # after a resume: read back from the metrics
            found = self.out.find_record(lambda r: r.get("eval") and r["step"] == 0) or {}
            before = {k[len("eval/"):]: v for k, v in found.items() if k.startswith("eval/")} or None
        steps = self.phases[1].steps
        summary = {"task": "reward", "loss": self.loss, "hparams": {**self.hp, "heads": self.heads},
                   "num_labels": self.model.config.num_labels, "attributes": self.attrs, "train_steps": steps,
                   "train_examples": len(self.train), "eval_examples": len(self.held) if self.held else 0,
                   "eval_reward_accuracy": final and final["reward_accuracy"], "eval_mse": final and final.get("mse"),
                   "eval_before": before, "wall_seconds": round(time.time() - self.t0, 2),
                   "final_model": str(self.out.folder / "final"), "data": self.cfg.data or "synthetic"}
        self.out.save_final(self.model, self.tok)
        self.out.save_summary(summary, self._plot if self.cfg.plots else None)
        self.log(f"reward model ({self.loss}): held-out reward accuracy {summary['eval_reward_accuracy']} "
                 f"(before {before and before['reward_accuracy']}), {steps} steps, {summary['wall_seconds']} s → "
                 f"{summary['final_model']}")
        return summary


    @staticmethod
    def _plot(metrics: Path, folder: Path) -> None:
        from .plots import REWARD_PANELS, plot

        plot(metrics, folder, REWARD_PANELS)


def train_reward(cfg: Config) -> dict:
    """Train a reward model; returns the summary (also written to summary.json)."""
    cfg = _resolved(cfg)
    if cfg.distributed not in ("none", "auto"):
        raise SystemExit("--task reward runs in a single process (no --distributed ddp/fsdp yet)")
    reward_loss(cfg)  # refuse a wrong --loss before anything is loaded
    with claimed(cfg, RewardRun.task):
        return launch(lambda d: RewardRun(cfg, d).run(), threads=cfg.threads, distributed="none", device=cfg.device)
