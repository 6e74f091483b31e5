"""The run core that every task of ``fastpref train`` stands on (see the package docstring for the map).

* set-up: :func:`launch` (threads, process group, device), :func:`load_tokenizer`, :class:`Core` (the output
  folder, the tokenizer and its pad id, the step counter, mixed precision);
* the step: :class:`Phase` (a stretch of optimizer steps with its learning-rate schedule, :func:`lr_at`) and
  :meth:`Core.steps` (micro-batches, gradient accumulation, clipping, the optimizer step, averaged metrics);
  :func:`sft_micro_step`, the one SFT step (negative log-likelihood of the target answers);
* checkpoints, metrics, the final model and the summary: :class:`~fastpref.train.outputs.Outputs`;
* evaluation: :mod:`fastpref.train.evaluate` (greedy generation) and :func:`objective.dataset_logps` (scoring).
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from . import data as D
from .dist import Dist, setup
from .folder import allowed, identity
from .objective import call
from .outputs import Outputs
from .validate import UserError


class NonFinite(UserError):
    """Training met a non-finite loss or gradient: the run stops before the optimizer applies it."""


def stop_if_not_finite(step: int, phase: str, values: dict[str, float]) -> None:
    """Raise :class:`NonFinite` (one line naming step ``step`` of ``phase`` and each non-finite value of
    ``values``, e.g. the loss and the gradient norm) unless every value is finite."""
    bad = [f"{name} = {v}" for name, v in values.items() if not math.isfinite(v)]
    if bad:
        raise NonFinite(f"training stopped at step {step} ({phase}): {', '.join(bad)}; the step was not applied "
                        "and no checkpoint, final model or summary was written from it (lower --lr or "
                        "--max-grad-norm, or check the data's numbers; --resume auto continues from the last "
                        "checkpoint)")


def load_tokenizer(model: str | None, tokenizer: str | None = None):
    """The tokenizer of ``tokenizer``, else of ``model`` (local folders only), else the bundled demo tokenizer."""
    src = tokenizer or model
    if src is None:
        from .synthetic import load_tokenizer as bundled

        return bundled()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(src, local_files_only=True)


def lr_at(step: int, total: int, base: float, warmup_ratio: float, min_ratio: float) -> float:
    """Linear warm-up, then cosine decay to ``min_ratio·base`` (a pure function of the step: exact resume)."""
    warm = max(1, round(warmup_ratio * total)) if warmup_ratio > 0 else 0
    if step < warm:
        return base * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def launch(body: Callable[[Dist], dict], *, threads: int | None, distributed: str, device: str) -> dict:
    """Set the CPU thread count, start the process group (``distributed``: none / ddp / fsdp) on ``device``,
    run ``body(dist)`` and close the group; returns what ``body`` returns (the run summary)."""
    if threads:
        torch.set_num_threads(threads)
    d = setup(distributed, device)
    try:
        return body(d)
    finally:
        d.close()


def environment(backend: str, device: torch.device) -> dict:
    """What produced the numbers: the fused-op backend (the one 'auto' picked), device and package versions."""
    import fastpref
    from ..backends import resolve

    try:
        picked = resolve(backend, device, torch.float32).name
    except ValueError as e:
        picked = f"unavailable ({e})"
    versions = {"fastpref": getattr(fastpref, "__version__", None), "torch": torch.__version__}
    for name in ("transformers", "triton"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"backend": picked, "backend_requested": backend, "device": str(device), "versions": versions}


@dataclass(frozen=True)
class Phase:
    """Steps ``[start, start + steps)`` of the run's step counter, trained with one optimizer whose learning rate
    follows :func:`lr_at` from ``lr`` (``warmup_ratio`` 0 and ``min_lr_ratio`` 1: constant)."""

    name: str
    start: int
    steps: int
    lr: float
    warmup_ratio: float
    min_lr_ratio: float

    @property
    def end(self) -> int:
        return self.start + self.steps

    def lr_at(self, step: int) -> float:
        """The learning rate of the run's step ``step`` (within this phase)."""
        return lr_at(step - self.start, self.steps, self.lr, self.warmup_ratio, self.min_lr_ratio)


class Core:
    """What every run has: settings ``cfg`` (``output_dir``, ``keep_checkpoints``, ``model``, ``tokenizer``,
    ``seed``, ``max_grad_norm``; ``grad_accum`` and ``bf16`` where the task has them), the process ``d``, the
    output folder, the tokenizer, the step counter, and the optimizer steps of a :class:`Phase`. ``task`` names
    the task in the run's identity (``run.json``, checkpoints: a resume must match it)."""

    task = "preference"

    def __init__(self, cfg: Any, d: Dist):
        self.cfg, self.d = cfg, d
        self.t0 = time.time()
        self.log = print if d.main else (lambda *a, **k: None)
        self.out = Outputs(cfg.output_dir, d, cfg.keep_checkpoints, self.log, identity(self.task, cfg),
                           allowed(cfg))
        self.tok = load_tokenizer(cfg.model, cfg.tokenizer)
        self.pad_id = D.pad_id_of(self.tok)
        self.step = 0
        self.bf16 = getattr(cfg, "bf16", "off")
        self.use_cuda_amp = d.device.type == "cuda" and self.bf16 != "off"

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast as ``--bf16`` asks (auto: on CUDA only), else a no-op context."""
        if self.use_cuda_amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        if self.bf16 == "on":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def optimizer(self, module: nn.Module, lr: float) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters of ``module``."""
        return torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr,
                                 weight_decay=self.cfg.weight_decay)

    def steps(self, phase: Phase, module: nn.Module, opt: torch.optim.Optimizer,
              micro_step: Callable[[int, int], dict]) -> Iterator[dict]:
        """Run the optimizer steps of ``phase`` from the current step; yields each step's record: the mean over
        micro-batches (and ranks) of what ``micro_step(step, micro)`` returned (it runs forward and backward of
        one micro-batch, its loss already divided by the accumulation count), with step (after the update),
        phase, lr, grad_norm (before clipping) and time. A non-finite loss or gradient norm stops the run
        (:class:`NonFinite`) before the optimizer step."""
        accum = getattr(self.cfg, "grad_accum", 1)
        while self.step < phase.end:
            lr = phase.lr_at(self.step)
            for g in opt.param_groups:
                g["lr"] = lr
            recs = []
            for m in range(accum):
                ctx = module.no_sync() if (self.d.mode == "ddp" and m < accum - 1) else contextlib.nullcontext()
                with ctx:
                    recs.append(micro_step(self.step, m))
            # the parameters are listed after the backward pass: FSDP swaps them between sharded and unsharded
            gn = torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.requires_grad],
                                                self.cfg.max_grad_norm)
            gn = gn.full_tensor() if hasattr(gn, "full_tensor") else gn
            rec = self.mean(recs)
            terms = {k: v for k, v in rec.items() if k == "loss" or k.startswith("loss/")}  # loss/<name>: a term
            stop_if_not_finite(self.step + 1, phase.name, {**terms, "grad_norm": float(gn)})
            opt.step()
            opt.zero_grad(set_to_none=True)
            self.step += 1
            rec.update(step=self.step, phase=phase.name, lr=lr, grad_norm=float(gn), time=time.time() - self.t0)
            yield rec

    def mean(self, recs: list[dict]) -> dict:
        """The mean of each key over ``recs`` and over the ranks (a key missing from a record counts 0)."""
        keys = sorted(set().union(*recs))
        vals = torch.tensor([sum(r.get(k, 0.0) for r in recs) / len(recs) for k in keys], dtype=torch.float64)
        self.d.sum_(vals)
        return {k: float(v) / self.d.world for k, v in zip(keys, vals)}

    def rng_state(self) -> dict:
        """The random-number generators' state, for a checkpoint."""
        state = {"rng": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state(self.d.device)
        return state

    def set_rng_state(self, trainer_state: dict) -> None:
        """Restore the random-number generators from a checkpoint's trainer state."""
        torch.set_rng_state(trainer_state["rng"])
        if "cuda_rng" in trainer_state and torch.cuda.is_available():
            torch.cuda.set_rng_state(trainer_state["cuda_rng"], self.d.device)


def sft_micro_step(module: nn.Module, data: D.Dataset, chunk: list[int], idx: list[int], *, d: Dist, packed: bool,
                   pad_id: int, pack_length: int | None, grad_accum: int, autocast: Callable) -> dict:
    """The one SFT step: forward and backward of the negative log-likelihood of the target answers of examples
    ``idx`` (this rank's part of the global micro-batch ``chunk``), per target token of the whole micro-batch.
    ``module``: an :class:`~fastpref.train.objective.Objective` (or its DDP / FSDP wrapper). Returns {"loss"}."""
    seqs = D.sequences(data, idx, "target")
    count = sum(len(c) for _, c in D.sequences(data, chunk, "target"))  # global target tokens
    if not seqs:  # e.g. an unpaired micro-batch without desirable rows
        seqs, count = D.sequences(data, idx[:1]), 0
    b = D.collate(seqs, packed=packed, pad_id=pad_id, pack_length=pack_length).to(d.device)
    with autocast():
        out = call(module, b, mode="sft", norm=max(count, 1) / d.world)
    loss = out["loss"] * (1.0 if count else 0.0)
    (loss / grad_accum).backward()
    return {"loss": float(loss.detach()) * d.world}
