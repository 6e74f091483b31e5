"""Settings of the online mode (``fastpref train --online``): flags and/or ``--config`` YAML (flags win)."""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable

from ..config import _Parser, _join_negative_numbers, parse_kv, read_yaml
from ..validate import ONLINE_NUMBERS, UserError, check_numbers, check_path
from .algorithms import ALGORITHMS

# The embedded demo (synthetic task, no --model): a weak SFT start, then SPPO rounds judged by the verifier.
# SPPO / GPO's paper β = 0.001 (7B models, lr 5e-7) makes targets of ±500 nats; the tiny demo uses β = 0.1.
SYNTHETIC_DEFAULTS = dict(sft_steps=1500, sft_lr=3e-3, prompts_per_round=1024, batch_size=32, lr=1e-3, epochs=2.0,
                          max_new_tokens=8, threads=1)
SYNTHETIC_ITERATIVE = dict(rounds=10, beta={"sppo": 0.1, "gpo": 0.1})
REAL_DEFAULTS = dict(sft_steps=0, sft_lr=1e-5, prompts_per_round=512, batch_size=8, lr=5e-7, epochs=1.0,
                     max_new_tokens=128, threads=None)


@dataclass
class OnlineConfig:
    """All online-mode settings; ``None`` = the algorithm's / task's default."""

    algorithm: str = "sppo"
    output_dir: str = "runs/online"
    overwrite: bool = False
    model: str | None = None
    ref_model: str | None = None
    tokenizer: str | None = None
    prompts: str | None = None
    eval_prompts: str | None = None
    judge: str | None = None
    judge_temperature: float | None = None
    judge_timeout: float = 600.0
    rounds: int | None = None
    samples: int | None = None
    prompts_per_round: int | None = None
    epochs: float | None = None
    batch_size: int | None = None
    lr: float | None = None
    beta: float | None = None
    loss_args: Any = None
    margin: float = 0.0
    reference: str | None = None
    mixture_coef: float = 0.5
    teacher: bool | None = None
    xpo_history: int | None = None
    keep_dropout: bool = False
    extragradient: bool | None = None
    lr_schedule: str = "linear"
    restart_optimizer: bool = True
    temperature: float | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None
    gen_batch: int = 64
    sft_steps: int | None = None
    sft_lr: float | None = None
    demo_correct_fraction: float = 0.4
    synthetic_train: int = 2000
    synthetic_eval: int = 256
    eval_every: int | None = None
    save_every: int = 0
    keep_checkpoints: int = 2
    resume: str | None = None
    resume_allow: str | None = None
    seed: int = 0
    threads: int | None = None
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    ref_dtype: str | None = None
    device: str = "auto"
    backend: str = "auto"
    distributed: str = "auto"
    plots: bool = True
    progress: bool = True

    @property
    def synthetic(self) -> bool:
        return self.prompts is None

    def resolved(self) -> "OnlineConfig":
        """A copy with the task's and the algorithm's defaults filled in (after validation)."""
        validate(self)
        alg = ALGORITHMS[self.algorithm]
        base = dict(SYNTHETIC_DEFAULTS if self.synthetic else REAL_DEFAULTS)
        base.update(rounds=alg.rounds, extragradient=alg.extragradient, samples=alg.samples,
                    reference=alg.reference, eval_every=1 if not alg.online else max(1, alg.rounds // 10),
                    temperature=1.0 if self.synthetic else alg.sampling[0],
                    top_p=1.0 if self.synthetic else alg.sampling[1])
        if self.synthetic and not alg.online and self.model is None:
            base.update(rounds=SYNTHETIC_ITERATIVE["rounds"], beta=SYNTHETIC_ITERATIVE["beta"].get(alg.name))
        if alg.online:  # one batch of prompts per round: fresh samples every step
            base["prompts_per_round"] = None
        if alg.rl:  # one on-policy step per fresh batch unless --epochs asks for PPO-style steps
            base["epochs"] = 1.0
        out = dataclasses.replace(self, **{k: v for k, v in base.items() if getattr(self, k) is None})
        if alg.online:
            out.prompts_per_round = out.batch_size
        if out.judge_temperature is None:
            out.judge_temperature = 0.0 if out.judge in (None, "verifier") else 1.0
        return out

    def hparams(self) -> dict:
        h = dict(ALGORITHMS[self.algorithm].hparams)
        h.update(parse_kv(self.loss_args))
        if self.beta is not None:
            h["beta"] = self.beta
        if h.get("loss_type") == "dr_grpo" and self.max_new_tokens and "max_completion_length" not in h:
            h["max_completion_length"] = self.max_new_tokens  # Dr. GRPO divides by the generation budget
        return h


def validate(c: OnlineConfig) -> None:
    """Refuse bad settings before any heavy work, naming the setting and what is expected."""
    def bad(msg: str):
        raise SystemExit(msg)

    if c.algorithm not in ALGORITHMS:
        bad(f"unknown --algorithm {c.algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    alg = ALGORITHMS[c.algorithm]
    need = {"sppo": 2, "gpo": 2, "iterative_dpo": 2, "dno": 2, "inpo": 2, "online_dpo": 2, "online_ipo": 2,
            "vpo": 2}.get(alg.name, 2 if alg.rl else 1)
    if c.samples is not None and c.samples < need:
        bad(f"--samples {c.samples}: {alg.name} needs at least {need} samples per prompt")
    if alg.name in ("inpo", "online_dpo", "online_ipo", "vpo", "nash_md", "xpo") and c.samples not in (None, alg.samples):
        bad(f"--samples: {alg.name} uses exactly {alg.samples} policy sample(s) per prompt")
    check_numbers(dataclasses.asdict(c), _flag, ONLINE_NUMBERS)  # each number: finite, in its range (UserError)
    if alg.online and not alg.rl and c.epochs not in (None, 1):
        bad(f"--epochs {c.epochs}: {alg.name} takes exactly one optimiser step per freshly sampled batch")
    if alg.rl:
        _validate_rl(c, alg.name, bad)
    if c.lr_schedule not in ("constant", "linear"):
        bad(f"--lr-schedule {c.lr_schedule!r}: expected 'constant' or 'linear'")
    if c.teacher and not alg.teacher:
        bad(f"--teacher: {alg.name} does not put a teacher answer among its candidates (dno does)")
    if c.xpo_history is not None and (not alg.accumulate or c.xpo_history < 0):
        bad(f"--xpo-history {c.xpo_history}: a number of earlier rounds >= 0, for the xpo algorithm only")
    if c.reference not in (None, "initial", "previous"):
        bad(f"--reference {c.reference!r}: expected 'initial' (π_ref) or 'previous' (π_t)")
    if c.distributed == "fsdp":
        bad("--distributed fsdp is not supported in online mode (use ddp: every rank holds the policy to generate)")
    if c.ref_dtype not in (None, "float32", "bfloat16", "float16"):
        bad(f"--ref-dtype {c.ref_dtype!r}: expected float32, bfloat16 or float16")
    for flag, value, kind in (("--model", c.model, "model"), ("--ref-model", c.ref_model, "model"),
                              ("--tokenizer", c.tokenizer, "tokenizer"), ("--prompts", c.prompts, "data"),
                              ("--eval-prompts", c.eval_prompts, "data")):
        check_path(flag, value, kind)  # the offline trainer's path checks (UserError)
    if c.prompts is not None and c.judge in (None, "verifier"):
        bad("--prompts needs --judge ('module:function', 'pairwise:module:function' or a reward-model folder); "
            "the verifier only knows the synthetic task")
    try:
        from .algorithms import ItemLoss

        ItemLoss(ALGORITHMS[c.algorithm].loss, c.hparams(), pad_id=0)
    except ValueError as e:
        bad(f"--algorithm {c.algorithm}: {e}")


def _validate_rl(c: OnlineConfig, name: str, bad: Callable[[str], None]) -> None:
    """The RL algorithms' own checks: whole PPO epochs, a reward judge, a known loss_type / KL estimator."""
    from ...losses.rl import KL_ESTIMATORS, LOSS_TYPES

    if c.epochs is not None and c.epochs != int(c.epochs):
        bad(f"--epochs {c.epochs}: {name} takes a whole number of optimiser steps on each fresh batch")
    if (c.judge or "").startswith("pairwise:"):
        bad(f"--judge {c.judge}: {name} needs rewards (a reward function, a reward model or the verifier), "
            "not a pairwise judge")
    h = c.hparams()
    if h.get("loss_type") not in LOSS_TYPES:
        bad(f"--loss-args loss_type={h.get('loss_type')}: expected one of {', '.join(LOSS_TYPES)}")
    if h.get("kl_estimator", "k3") not in KL_ESTIMATORS:
        bad(f"--loss-args kl_estimator={h.get('kl_estimator')}: expected one of {', '.join(KL_ESTIMATORS)}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


HELP = {
    "algorithm": "which algorithm (see the list below)",
    "output_dir": "the run's folder (default: runs/online for sppo, runs/online-<algorithm> for the others)",
    "prompts": "JSONL/Parquet/datasets file with a 'prompt' field (default: the synthetic task)",
    "eval_prompts": "held-out prompts for the per-round evaluation (default: the synthetic held-out set, "
                    "or the first 64 training prompts)",
    "judge": "'verifier' (synthetic default), 'module:function' (reward function), 'pairwise:module:function' "
             "(P(a ≻ b)) or a local sequence-classification reward-model folder",
    "judge_temperature": "P(y ≻ y') = σ((r − r')/τ) for reward judges (0: hard 1/½/0; default 1, verifier 0)",
    "judge_timeout": "seconds a judge function may take for one call before the run stops (default 600)",
    "rounds": "rounds (iterative) or steps (online) (default: the algorithm's)",
    "samples": "K completions per prompt from the policy (default: the algorithm's)",
    "prompts_per_round": "prompts sampled per round (iterative algorithms)",
    "epochs": "passes over each round's items (iterative algorithms; an online step is one pass)",
    "lr_schedule": "'linear' (default, as the official pipelines): warm-up over 10%% of each round's steps then "
                   "decay to 0 (iterative), decay to 0 over the run (online); 'constant'",
    "restart_optimizer": "iterative algorithms: fresh optimiser state each round (default, as the official "
                         "pipelines); --no-restart-optimizer carries it across rounds",
    "temperature": "sampling temperature (default: the algorithm's paper's on real models, 1 on the synthetic task)",
    "top_p": "nucleus sampling (default: the algorithm's paper's on real models, 1 on the synthetic task)",
    "margin": "DNO's large-margin filter: keep a (best, worst) pair only when their win-rate gap exceeds it",
    "reference": "'initial' (π_ref) or 'previous' (π_t, DNO) for the loss's reference log-probs",
    "mixture_coef": "Nash-MD's β of the geometric mixture π_θ^(1−β)·π_ref^β",
    "teacher": "DNO: the prompts' reference answer (a 'teacher', 'reference' or 'chosen' field) joins the K "
               "samples as a candidate (default: on when the data has one, as the paper); --no-teacher: samples only",
    "xpo_history": "XPO: each step draws its batch from the items of this round and the N rounds before it "
                   "(default: all rounds so far, as the paper; 0: the fresh batch only, as TRL's XPOTrainer)",
    "keep_dropout": "keep the model's dropout in training (default: off, every dropout probability set to 0, as "
                    "TRL's online trainers)",
    "extragradient": "extragradient steps over the base optimiser (EGPO; default on for online_ipo)",
    "sft_steps": "SFT warm-up steps of the synthetic demo's starting policy",
    "demo_correct_fraction": "fraction of the demo's SFT demonstrations that are right (the others add K + 1)",
    "eval_every": "evaluate (greedy answers, win-rate vs start, KL) every N rounds",
    "save_every": "also checkpoint every N optimizer steps (0: at evaluated round ends only)",
    "resume": "'auto' (newest valid checkpoint in --output-dir) or a checkpoint folder",
    "resume_allow": "settings that may differ from the resumed run's, comma-separated (rounds, eval_every)",
    "overwrite": "replace an earlier run in --output-dir (only the files it wrote; without it such a folder is "
                 "refused)",
    "loss_args": "loss hyper-parameters, e.g. tau=0.1,eta=0.2 (repeatable)",
    "ref_dtype": "dtype of the reference model (default: the policy's)",
}


def parser() -> argparse.ArgumentParser:
    epilog = ("algorithms (paper defaults; online ones: --rounds counts steps):\n" +
              "\n".join("  " + a.describe() for a in ALGORITHMS.values()) +
              "\n\nOn the synthetic task the iterative algorithms default to 10 rounds, and SPPO/GPO to beta=0.1 "
              "(the paper's 0.001 is for 7B models).\nDetails: docs/online.md")
    ap = _Parser(prog="fastpref train --online", formatter_class=argparse.RawDescriptionHelpFormatter,
                                 description="Online / iterative preference training: generate, judge, train, "
                                 "repeat. With no other arguments: SPPO on the synthetic task (CPU, no download).",
                                 epilog=epilog)
    ap.add_argument("--online", action="store_true", help="online mode (this parser)")
    ap.add_argument("--config", help="YAML file with any of these settings (underscored names); flags win")
    bools = {"extragradient", "plots", "progress", "restart_optimizer", "overwrite", "teacher", "keep_dropout"}
    choices = {"algorithm": list(ALGORITHMS), "reference": ["initial", "previous"], "device": ["auto", "cpu", "cuda"],
               "lr_schedule": ["constant", "linear"],
               "distributed": ["auto", "none", "ddp"], "ref_dtype": ["float32", "bfloat16", "float16"]}
    for f in dataclasses.fields(OnlineConfig):
        if f.name in bools:
            ap.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                            help=HELP.get(f.name))
        elif f.name == "loss_args":
            ap.add_argument(_flag(f.name), dest=f.name, action="append", default=None, help=HELP.get(f.name))
        else:
            typ = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
            ap.add_argument(_flag(f.name), dest=f.name, type=typ, default=None, choices=choices.get(f.name),
                            help=HELP.get(f.name))
    return ap


def wants_online(argv: list[str]) -> bool:
    """Whether ``fastpref train`` arguments ask for the online mode (``--online`` or ``online: true`` in YAML)."""
    if "--online" in argv:
        return True
    for i, a in enumerate(argv):
        path = argv[i + 1] if a == "--config" and i + 1 < len(argv) else a[9:] if a.startswith("--config=") else None
        if path and os.path.isfile(path):
            try:
                return bool(read_yaml(path)[0].get("online"))
            except UserError:
                return False
    return False


def load_config(argv: list[str] | None = None) -> OnlineConfig:
    ns = parser().parse_args(_join_negative_numbers(list(argv if argv is not None else [])))
    values: dict[str, Any] = {}
    if ns.config:
        data, lines = read_yaml(ns.config)
        data.pop("online", None)
        known = {f.name for f in dataclasses.fields(OnlineConfig)}
        unknown = sorted(k for k in data if k not in known)
        if unknown:
            raise SystemExit(f"{ns.config}: unknown online setting(s) {unknown}")
        values.update(check_numbers(data, lambda k: f"{ns.config} line {lines.get(k, '?')}: {k}", ONLINE_NUMBERS))
    flags = {k: v for k, v in vars(ns).items() if v is not None and k not in ("config", "online")}
    values.update(check_numbers(flags, _flag, ONLINE_NUMBERS))
    if values.get("distributed", "auto") == "auto":
        values["distributed"] = "ddp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "none"
    algorithm = values.get("algorithm", OnlineConfig.algorithm)
    if "output_dir" not in values and algorithm != OnlineConfig.algorithm:  # each algorithm's demo its own folder
        values["output_dir"] = f"{OnlineConfig.output_dir}-{algorithm}"
    return OnlineConfig(**values)
