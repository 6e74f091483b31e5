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
``AutoModelForSequenceClassification.from_pretrained``. Single process; no checkpoints or resume.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import losses as L
from ..nn import loss_params
from . import data as D
from .config import REAL_DEFAULTS, SYNTHETIC_DEFAULTS, Config
from .dist import setup
from .fields import source

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
        pick = lambda e: int(hashlib.sha256(e.prompt_key.encode()).hexdigest()[:8], 16) % 10_000 \
            < cfg.eval_fraction * 10_000  # noqa: E731
        ev = [e for e in full.examples if pick(e)]
        held = D.Dataset(full.layout, ev, full.source + " (held-out split)") if ev else None
        full = D.Dataset(full.layout, [e for e in full.examples if not pick(e)] or ev, full.source)
    return full, held, attrs


# ----------------------------------------------------------------------------------------------------- model
def outputs_for(loss: str, heads: int, attrs: list[str] | None) -> int:
    """Number of model outputs the loss reads."""
    return {"regression": len(attrs or [1]), "gpm": 2 * heads, "micro": 2 * heads}.get(loss, 1)


def sft_warmup(cfg: Config, tok, train: D.Dataset, pad_id: int, device) -> nn.Module:
    """A causal LM (the demo model or --model) after --sft-steps on the preferred answers: the reward model's
    body starts from it (as InstructGPT's reward models start from the SFT policy)."""
    from ..nn import PreferenceLoss
    from .model import load_model, tiny_model
    from .objective import Objective, call

    lm = (tiny_model(len(tok), cfg.seed) if cfg.model is None else load_model(cfg.model)).to(device).train()
    obj = Objective(lm, PreferenceLoss("sft"), backend=cfg.backend)
    opt = torch.optim.AdamW(lm.parameters(), lr=cfg.sft_lr, weight_decay=cfg.weight_decay)
    for step in range(cfg.sft_steps):
        idx = D.order(len(train), cfg.seed + 1, step * cfg.batch_size, cfg.batch_size)
        seqs = D.sequences(train, idx, "target")
        b = D.collate(seqs, packed=False, pad_id=pad_id).to(device)
        call(obj, b, mode="sft", norm=max(1, sum(len(c) for _, c in seqs)))["loss"].backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return lm


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
def train_reward(cfg: Config) -> dict:
    """Train a reward model; returns the summary (also written to summary.json)."""
    cfg = _resolved(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.distributed not in ("none", "auto"):
        raise SystemExit("--task reward runs in a single process (no --distributed ddp/fsdp yet)")
    weights = cfg.loss_weights()
    if len(weights) != 1 or next(iter(weights)) not in LOSSES:
        raise SystemExit(f"--task reward takes one of --loss {', '.join(LOSSES)}, got {','.join(weights)}")
    loss = next(iter(weights))
    hp = cfg.loss_hparams()
    hp.pop("beta", None)
    heads = int(hp.pop("heads", 2))
    fn = L.get(loss)
    bad = sorted(set(hp) - loss_params(fn))
    if bad:
        raise SystemExit(f"--loss-args {bad} are not taken by {loss} (reward-model keys: heads)")
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    device = setup("none", cfg.device).device  # single process: only the --device choice
    from .loop import _tokenizer

    tok = _tokenizer(cfg)
    pad_id = D.pad_id_of(tok)
    train, held, attrs = load(cfg, tok)
    if (loss == "regression") != (attrs is not None):
        want = "score rows {prompt, response, scores}" if loss == "regression" else \
            "pairwise rows {prompt, chosen, rejected}"
        raise SystemExit(f"--loss {loss} needs {want} (got {'score' if attrs else 'pairwise'} rows)")
    if loss == "scaled_bt" and "strength" not in train.examples[0].numbers:
        raise SystemExit(f"--loss scaled_bt needs the preference strength: {source('strength')}")
    lm = sft_warmup(cfg, tok, train, pad_id, device) if cfg.sft_steps and attrs is None else None
    model = make_model(cfg, tok, outputs_for(loss, heads, attrs), lm).to(device).train()
    del lm
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.jsonl").unlink(missing_ok=True)
    steps = cfg.steps or max(1, math.ceil(cfg.epochs * len(train) / cfg.batch_size))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    from .loop import lr_at

    def log(rec: dict) -> None:
        with open(out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")

    def ev(step: int) -> dict | None:
        if held is None:
            return None
        m = evaluate(model, held, loss, heads, pad_id, device, cfg.eval_batch_size)
        log({"step": step, "eval": True, **{f"eval/{k}": v for k, v in m.items()}})
        return m

    before = ev(0)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, cfg.lr, cfg.warmup_ratio, cfg.min_lr_ratio)
        idx = D.order(len(train), cfg.seed, step * cfg.batch_size, cfg.batch_size)
        out = forward(model, train, idx, pad_id, device)
        kw, score = loss_terms(loss, out, len(idx), heads, _numbers(train, idx, device))
        value = fn(**kw, **hp).mean()
        value.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % max(cfg.log_every, 1) == 0 or step == 0 or step + 1 == steps:
            log({"step": step + 1, "loss": float(value.detach()), "accuracy": float((score > 0).float().mean()),
                 "grad_norm": float(gn), "time": time.time() - t0})
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < steps:
            ev(step + 1)
    final = ev(steps)
    model.save_pretrained(str(out_dir / "final"), safe_serialization=True)
    tok.save_pretrained(str(out_dir / "final"))
    summary = {"task": "reward", "loss": loss, "hparams": {**hp, "heads": heads}, "num_labels": model.config.num_labels,
               "attributes": attrs, "train_steps": steps, "train_examples": len(train),
               "eval_examples": len(held) if held else 0,
               "eval_reward_accuracy": final and final["reward_accuracy"],
               "eval_mse": final and final.get("mse"), "eval_before": before,
               "wall_seconds": round(time.time() - t0, 2), "final_model": str(out_dir / "final"),
               "data": cfg.data or "synthetic"}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if cfg.plots:
        from .plots import REWARD_PANELS, plot

        plot(out_dir / "metrics.jsonl", out_dir, REWARD_PANELS)
    print(f"reward model ({loss}): held-out reward accuracy {summary['eval_reward_accuracy']} "
          f"(before {before and before['reward_accuracy']}), {steps} steps, {summary['wall_seconds']} s → "
          f"{summary['final_model']}")
    return summary
