"""Trainer configuration: flags and/or a YAML file (flags win), and the loss specification."""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

# Settings of the embedded default (the synthetic task), used where neither flags nor YAML set them.
SYNTHETIC_DEFAULTS = dict(sft_steps=300, steps=150, batch_size=32, lr=1e-3, sft_lr=3e-3, max_length=32,
                          eval_every=50, save_every=100, warmup_ratio=0.1, threads=1,
                          pack_length=64)
# Settings for real data.
REAL_DEFAULTS = dict(sft_steps=0, steps=None, batch_size=4, lr=5e-7, sft_lr=1e-5, max_length=1024,
                     eval_every=200, save_every=500, warmup_ratio=0.1, threads=None)


@dataclass
class Config:
    """All trainer settings. ``None`` means: the default for the synthetic task or for real data."""

    output_dir: str = "runs/demo"
    task: str = "preference"
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


def _scalar(v: str) -> Any:
    import yaml

    return yaml.safe_load(v)


def parse_loss(spec: Any) -> dict[str, float]:
    """``"sigmoid"``, ``"sigmoid=1,sft=0.5"``, a list of names or a {name: weight} mapping → {name: weight}."""
    if isinstance(spec, dict):
        return {str(k): float(v) for k, v in spec.items()}
    if isinstance(spec, (list, tuple)):
        out: dict[str, float] = {}
        for s in spec:
            out.update(parse_loss(s))
        return out
    out = {}
    for part in str(spec).split(","):
        if not part.strip():
            continue
        name, _, w = part.partition("=")
        out[name.strip()] = float(w) if w.strip() else 1.0
    if not out:
        raise ValueError("--loss names no loss")
    return out


def parse_kv(spec: Any) -> dict[str, Any]:
    """``"label_smoothing=0.1,f_divergence_type=js"`` or a mapping → {key: value} (YAML scalars)."""
    if not spec:
        return {}
    if isinstance(spec, dict):
        return dict(spec)
    if isinstance(spec, (list, tuple)):
        out: dict[str, Any] = {}
        for s in spec:
            out.update(parse_kv(s))
        return out
    out = {}
    for part in str(spec).split(","):
        if part.strip():
            k, eq, v = part.partition("=")
            if not eq:
                raise ValueError(f"--loss-args: expected key=value, got {part!r}")
            out[k.strip()] = _scalar(v.strip())
    return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parser() -> argparse.ArgumentParser:
    """The ``fastpref train`` argument parser (every Config field is a flag)."""
    ap = argparse.ArgumentParser(prog="fastpref train", description="Preference training (DPO and relatives) "
                                 "with fused losses. With no arguments: the bundled synthetic demo on CPU.")
    ap.add_argument("--config", help="YAML file with any of these settings (underscored names); flags win")
    bools = {"skip_bad_rows", "gradient_checkpointing", "plots", "progress"}
    choices = {"task": ["preference", "reward"], "truncation": ["end", "error"], "ref_mode": ["auto", "precompute", "online"],
               "packing": ["auto", "on", "off"], "bf16": ["auto", "on", "off"],
               "distributed": ["auto", "none", "ddp", "fsdp"], "device": ["auto", "cpu", "cuda"]}
    helps = {"loss": "registry name(s) with weights, e.g. sigmoid or sigmoid=1,sft=0.5 (repeatable)",
             "loss_args": "loss hyper-parameters, e.g. label_smoothing=0.1 (repeatable)",
             "resume": "'auto' (newest valid checkpoint in --output-dir) or a checkpoint folder",
             "model": "local Hugging Face causal LM folder (default: the tiny demo model)",
             "ref_model": "reference model folder (default: frozen copy of the policy after SFT warm-up)",
             "task": "'preference' (a policy, DPO and relatives) or 'reward' (a reward model: --loss bt, "
                     "scaled_bt, regression, gpm or micro)",
             "prev_model": "previous-iterate model folder (SPPO / INPO / GPO: its log-probs are precomputed)",
             "token_reward_model": "token-reward model folder (TGDPO: its token log-probs every step)",
             "data": "JSONL / Parquet file or `datasets` folder (default: the synthetic task)",
             "steps": "optimizer steps of preference training (default: --epochs over the data)",
             "sft_steps": "SFT warm-up steps on the preferred answers before preference training",
             "pack_length": "packed rows hold at most this many tokens (default: --max-length; 0: one row)",
             "skip_bad_rows": "skip (and count) bad data rows instead of stopping with an error",
             "truncation": "over-long rows: 'end' cuts the completion's end, 'error' refuses the row"}
    for f in dataclasses.fields(Config):
        if f.name == "extra":
            continue
        if f.name in bools:
            ap.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                            help=helps.get(f.name))
        elif f.name in ("loss", "loss_args"):
            ap.add_argument(_flag(f.name), dest=f.name, action="append", default=None, help=helps.get(f.name))
        else:
            typ = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
            ap.add_argument(_flag(f.name), dest=f.name, type=typ, default=None, choices=choices.get(f.name),
                            help=helps.get(f.name))
    return ap


def load_config(argv: list[str] | None = None) -> Config:
    """Config from a YAML file (``--config``) overridden by flags."""
    ns = parser().parse_args(argv)
    values: dict[str, Any] = {}
    if ns.config:
        import yaml

        with open(ns.config, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise SystemExit(f"{ns.config}: expected a mapping of settings")
        known = {f.name for f in dataclasses.fields(Config)}
        unknown = sorted(k for k in (k.replace("-", "_") for k in data) if k not in known)
        if unknown:
            raise SystemExit(f"{ns.config}: unknown setting(s) {unknown}")
        values.update({k.replace("-", "_"): v for k, v in data.items()})
    values.update({k: v for k, v in vars(ns).items() if v is not None and k != "config"})
    if isinstance(values.get("loss"), list) and len(values["loss"]) == 1:
        values["loss"] = values["loss"][0]
    if values.get("distributed", "auto") == "auto":
        values["distributed"] = "ddp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "none"
    return Config(**values)
