"""Trainer configuration: flags and/or a YAML file (flags win), and the loss specification."""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .specs import parse_kv, parse_loss

# Settings of the embedded default (the synthetic task), used where neither flags nor YAML set them.
SYNTHETIC_DEFAULTS = dict(sft_steps=800, steps=300, batch_size=32, lr=1e-3, sft_lr=3e-3, max_length=32,
                          eval_every=50, save_every=200, warmup_ratio=0.1, threads=1,
                          pack_length=64)
# Settings for real data.
REAL_DEFAULTS = dict(sft_steps=0, steps=None, batch_size=4, lr=5e-7, sft_lr=1e-5, max_length=1024,
                     eval_every=200, save_every=500, warmup_ratio=0.1, threads=None)


REWARD_OUTPUT_DIR = "runs/reward"
# The demo's preference loss: DPO plus an NLL term on the chosen answers (RPO). Plain DPO on the demo task learns
# the right digits but then stops ending its answers (the EOS token's probability falls with the rejected
# answers'), so its exact answers vary from 0.27 to 0.75 with the seed; see docs/training.md.
DEMO_LOSS = "sigmoid=1,sft=0.2"


@dataclass
class Config:
    """All trainer settings. ``None`` means: the default for the synthetic task or for real data."""

    output_dir: str = "runs/demo"
    task: str = "preference"
    overwrite: bool = False
    model: str | None = None
    ref_model: str | None = None
    prev_model: str | None = None
    token_reward_model: str | None = None
    tokenizer: str | None = None
    data: str | None = None
    eval_data: str | None = None
    eval_fraction: float = 0.05
    skip_bad_rows: bool = False
    max_length: int | None = None
    max_prompt_length: int | None = None
    truncation: str = "end"
    pack_length: int | None = None
    loss: Any = "sigmoid"
    beta: float | None = None
    loss_args: Any = None
    ref_mode: str = "auto"
    sft_steps: int | None = None
    steps: int | None = None
    epochs: float = 1.0
    batch_size: int | None = None
    grad_accum: int = 1
    eval_batch_size: int = 64
    lr: float | None = None
    sft_lr: float | None = None
    warmup_ratio: float | None = None
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    packing: str = "auto"
    gradient_checkpointing: bool = False
    bf16: str = "auto"
    distributed: str = "auto"
    device: str = "auto"
    backend: str = "auto"
    threads: int | None = None
    save_every: int | None = None
    keep_checkpoints: int = 2
    resume: str | None = None
    resume_allow: str | None = None
    eval_every: int | None = None
    log_every: int = 10
    plots: bool = True
    progress: bool = True
    synthetic_train: int = 2000
    synthetic_eval: int = 256
    extra: dict = field(default_factory=dict)

    @property
    def synthetic(self) -> bool:
        return self.data is None

    def resolved(self) -> "Config":
        """A copy with the ``None`` defaults filled for the synthetic task or for real data."""
        base = SYNTHETIC_DEFAULTS if self.synthetic else REAL_DEFAULTS
        return dataclasses.replace(self, **{k: v for k, v in base.items() if getattr(self, k) is None})

    def loss_weights(self) -> dict[str, float]:
        return parse_loss(self.loss)

    def loss_hparams(self) -> dict[str, Any]:
        h = parse_kv(self.loss_args)
        if self.beta is not None:
            h["beta"] = self.beta
        return h


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


HELP = {  # field → what it means (the default is appended by parser())
    "output_dir": "folder for metrics.jsonl, summary.json, plots, checkpoints and the final model "
                  f"(--task reward: {REWARD_OUTPUT_DIR})",
    "task": "'preference' (a policy, DPO and relatives) or 'reward' (a reward model: --loss bt (its default), "
            "scaled_bt, regression, gpm or micro)",
    "prev_model": "previous-iterate model folder (SPPO / INPO / GPO: its log-probs are precomputed)",
    "token_reward_model": "token-reward model folder (TGDPO: its token log-probs every step)",
    "overwrite": "replace an earlier run in --output-dir (without it such a folder is refused)",
    "model": "local Hugging Face causal LM folder (default: the tiny demo model, trained from scratch)",
    "ref_model": "reference model folder (default: a frozen copy of the policy as preference training starts)",
    "tokenizer": "tokenizer folder (default: --model's, or the bundled demo tokenizer)",
    "data": "training data: .jsonl / .parquet file or `datasets` folder (default: the synthetic demo task)",
    "eval_data": "held-out data file (default: an --eval-fraction split of --data by prompt)",
    "eval_fraction": "share of --data prompts held out when --eval-data is not given",
    "skip_bad_rows": "skip (and count) bad data rows instead of stopping at the first",
    "max_length": "most tokens of prompt + completion",
    "max_prompt_length": "longer prompts keep their last tokens (default: no limit)",
    "truncation": "over-long rows: 'end' cuts the completion's end, 'error' refuses the row",
    "pack_length": "packed rows hold at most this many tokens (0: one sequence per row)",
    "loss": "loss name(s) with weights, e.g. sigmoid (= DPO) or sigmoid=1,sft=0.5; repeatable; paper names "
            f"such as dpo are mapped to the registry's (the synthetic demo's default: {DEMO_LOSS})",
    "beta": "the loss's beta, where it takes one (default: 0.1)",
    "loss_args": "loss hyper-parameters, e.g. label_smoothing=0.1 (repeatable)",
    "ref_mode": "reference log-probs computed once ('precompute') or every step ('online'); auto: online only "
                "for losses that need token statistics",
    "sft_steps": "SFT warm-up steps before preference training (demo: on the demonstrations; data: on the "
                 "preferred answers)",
    "steps": "optimizer steps of preference training, >= 1",
    "epochs": "passes over the data when --steps is not given",
    "batch_size": "examples (prompts) per optimizer step and process",
    "grad_accum": "micro-batches accumulated per optimizer step",
    "eval_batch_size": "examples per forward in evaluation",
    "lr": "peak learning rate of preference training",
    "sft_lr": "peak learning rate of the SFT warm-up",
    "warmup_ratio": "share of each phase's steps with linear warm-up, in [0, 1)",
    "min_lr_ratio": "the cosine decay ends at this share of the peak learning rate",
    "weight_decay": "AdamW weight decay",
    "max_grad_norm": "gradient clipping norm",
    "seed": "random seed (data order, initialisation)",
    "packing": "pack several sequences per row: auto (when the model supports it), on, off",
    "gradient_checkpointing": "recompute activations in the backward pass (less memory)",
    "bf16": "bfloat16 autocast: auto (on CUDA), on, off",
    "distributed": "auto (ddp under torchrun), none, ddp, fsdp",
    "device": "auto (CUDA when available), cpu, cuda",
    "backend": "fused-op backend: auto, torch, triton or native (summary.json records the one used)",
    "threads": "CPU threads for torch",
    "save_every": "checkpoint every this many steps (0: only at the end)",
    "keep_checkpoints": "newest checkpoints kept",
    "resume": "'auto' (newest valid checkpoint in --output-dir) or a checkpoint folder",
    "resume_allow": "settings that may differ from the resumed run's, comma-separated (steps, epochs, eval_every, "
                    "log_every)",
    "eval_every": "held-out evaluation every this many steps (0: only before and after preference training)",
    "log_every": "write training metrics every this many steps",
    "plots": "write PNG plots of the metrics",
    "progress": "show a progress bar",
    "synthetic_train": "demo task: training prompts",
    "synthetic_eval": "demo task: held-out prompts",
}
BOOLS = {"skip_bad_rows", "gradient_checkpointing", "plots", "progress", "overwrite"}
CHOICES = {"task": ["preference", "reward"], "truncation": ["end", "error"], "ref_mode": ["auto", "precompute", "online"],
           "packing": ["auto", "on", "off"], "bf16": ["auto", "on", "off"],
           "distributed": ["auto", "none", "ddp", "fsdp"], "device": ["auto", "cpu", "cuda"],
           "backend": ["auto", "torch", "triton", "native"]}


REAL_DEFAULT_TEXT = {"steps": "--epochs over the data", "pack_length": "--max-length", "threads": "torch's choice"}


def _default_text(name: str, default: Any) -> str:
    if name in SYNTHETIC_DEFAULTS:
        real = REAL_DEFAULTS.get(name)
        return f"demo: {SYNTHETIC_DEFAULTS[name]}, with --data: {REAL_DEFAULT_TEXT.get(name, real)}"
    if default is None or name in ("loss_args",):
        return ""
    return str(default).lower() if isinstance(default, bool) else str(default)


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (flag and what was expected), exit status 2, no usage dump."""

    def error(self, message: str):
        from .validate import UserError

        raise UserError(f"{message} (see {self.prog} --help)")


def parser() -> argparse.ArgumentParser:
    """The ``fastpref train`` argument parser (every Config field is a flag; --help lists meaning and default)."""
    ap = _Parser(prog="fastpref train", description="Preference training (DPO and relatives) with fused losses. "
                 "With no arguments: the bundled synthetic demo on the CPU (SFT on a sloppy demonstrator, then "
                 "DPO), writing to runs/demo.", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                 epilog="Online and iterative algorithms (SPPO, Nash-MD, ...): fastpref train --online --help. "
                        "Reward models: --task reward (writing to runs/reward).")
    ap.add_argument("--config", help="YAML file with any of these settings (underscored names); flags win")
    for f in dataclasses.fields(Config):
        if f.name == "extra":
            continue
        default = _default_text(f.name, f.default if f.default is not dataclasses.MISSING else None)
        text = HELP.get(f.name, f.name.replace("_", " ")) + (f" (default: {default})" if default else "")
        kw: dict[str, Any] = dict(dest=f.name, default=None, help=text.replace("%", "%%"))
        if f.name in BOOLS:
            ap.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kw)
        elif f.name in ("loss", "loss_args"):
            ap.add_argument(_flag(f.name), action="append", **kw)
        else:
            typ = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
            ap.add_argument(_flag(f.name), type=typ, choices=CHOICES.get(f.name), **kw)
    ap.formatter_class = argparse.HelpFormatter  # the defaults are in the texts already
    return ap


_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$", re.I)


def _join_negative_numbers(argv: list[str]) -> list[str]:
    """``--lr -1e-4`` → ``--lr=-1e-4`` (argparse reads "-1e-4" as a flag); the number check then refuses it."""
    out: list[str] = []
    for a in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and _NUMBER.match(a):
            out[-1] = f"{out[-1]}={a}"
        else:
            out.append(a)
    return out


def read_yaml(path: str) -> tuple[dict[str, Any], dict[str, int]]:
    """Settings of a YAML file and the line of each key; problems are UserErrors naming file and line."""
    import yaml

    from .validate import UserError

    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--config {path}: cannot read it ({e})") from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of settings (name: value), got {type(data).__name__}")
    lines = {str(k.value).replace("-", "_"): k.start_mark.line + 1 for k, _ in node.value}
    return {str(k).replace("-", "_"): v for k, v in data.items()}, lines


def _check_yaml(path: str, data: dict[str, Any], lines: dict[str, int]) -> None:
    """Names, yes/no values and choices of YAML settings (numbers are checked with the flags)."""
    import difflib

    from .validate import UserError

    known = [f.name for f in dataclasses.fields(Config) if f.name != "extra"]
    for k, v in data.items():
        at = f"{path} line {lines.get(k, '?')}: {k}"
        if k not in known:
            close = difflib.get_close_matches(k, known, n=1)
            raise UserError(f"{at}: unknown setting" + (f"; did you mean {close[0]!r}?" if close else ""))
        if k in BOOLS and not isinstance(v, bool):
            raise UserError(f"{at}: expected true or false, got {v!r}")
        if k in CHOICES and v not in CHOICES[k]:
            raise UserError(f"{at}: expected one of {', '.join(CHOICES[k])}, got {v!r}")


def load_config(argv: list[str] | None = None) -> Config:
    """Config from a YAML file (``--config``) overridden by flags, with every number checked (UserError)."""
    from .validate import check_numbers

    ns = parser().parse_args(_join_negative_numbers(list(argv if argv is not None else sys.argv[1:])))
    values: dict[str, Any] = {}
    if ns.config:
        data, lines = read_yaml(ns.config)
        _check_yaml(ns.config, data, lines)
        values.update(check_numbers(data, lambda k: f"{ns.config} line {lines.get(k, '?')}: {k}"))
    flags = {k: v for k, v in vars(ns).items() if v is not None and k != "config"}
    values.update(check_numbers(flags, _flag))
    if isinstance(values.get("loss"), list) and len(values["loss"]) == 1:
        values["loss"] = values["loss"][0]
    if values.get("distributed", "auto") == "auto":
        values["distributed"] = "ddp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "none"
    if values.get("task", "preference") == "preference" and "loss" not in values and values.get("data") is None:
        values["loss"] = DEMO_LOSS
    if values.get("task") == "reward" and "loss" not in values:
        values["loss"] = "bt"  # a reward model's default loss: Bradley–Terry
    if values.get("task") == "reward" and "output_dir" not in values:
        values["output_dir"] = REWARD_OUTPUT_DIR  # its own folder: the demos run in any order on a fresh clone
    return Config(**values)
