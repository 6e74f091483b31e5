"""Step-based runs in phases (the SFT phase, then the task's own training): the loop over phases and steps,
what is logged, evaluated and saved after each step, and checkpoints with exact resume. The preference and
reward tasks are :class:`PhasedRun` subclasses that fill in the hooks (what a phase trains, one micro-batch's
forward and backward, the model's state, the evaluation); the online task has rounds instead of phases and
uses :class:`~fastpref.train.run.Core` directly.
"""
from __future__ import annotations

import torch
from torch import nn

from .dist import load_optim_state, model_state, optim_state
from .objective import Objective
from .run import Core, Phase


def strip_objective(state: dict, prefix: str = "model.") -> dict:
    """The model's own state from the state of an :class:`Objective` that wraps it."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


class PhasedRun(Core):
    """A run of :class:`Phase` s. Subclasses set ``self.phases`` and implement :meth:`module_for`,
    :meth:`micro_step`, :meth:`trained` and :meth:`load_model_state`; they may override :meth:`begin`,
    :meth:`record`, :meth:`evaluate_now`, :meth:`describe`, :meth:`extra_state` / :meth:`load_extra_state` and
    :meth:`keep_record`."""

    phases: list[Phase]

    # ------------------------------------------------------------------------------------------- hooks
    def module_for(self, phase: Phase) -> nn.Module:
        """The module that ``phase`` trains (wrapped for DDP / FSDP where the task does so), built if needed;
        its optimizer is made right after."""
        raise NotImplementedError

    def begin(self, phase: Phase) -> None:
        """Set up the rest of ``phase`` once its optimizer exists (a reference, the evaluation before it). Under
        FSDP a forward pass may leave parameters unsharded, so nothing runs the model before the optimizer is
        made."""

    def micro_step(self, phase: Phase, step: int, micro: int) -> dict:
        """Forward and backward of micro-batch ``micro`` of step ``step``; returns its metrics."""
        raise NotImplementedError

    def trained(self) -> nn.Module:
        """The unwrapped module trained now (its state and its optimizer's state go into checkpoints)."""
        raise NotImplementedError

    def load_model_state(self, state: dict, phase: str) -> None:
        """Load a checkpoint's model state, saved during phase ``phase``."""
        raise NotImplementedError

    def record(self, phase: Phase, rec: dict) -> dict | None:
        """The metrics record to write for a step (None: none): every ``log_every`` steps, the first and the
        phase's last."""
        every = max(self.cfg.log_every, 1)
        return rec if self.step % every == 0 or self.step == phase.end or self.step == 1 else None

    def evaluate_now(self, phase: Phase) -> None:
        """The evaluation every ``eval_every`` steps."""

    def count_from(self, phase: Phase) -> int:
        """The step that ``eval_every`` counts from in ``phase`` (0: the run's step counter)."""
        return 0

    def describe(self, phase: Phase) -> str:
        """The progress bar's label during ``phase``."""
        return phase.name

    def extra_state(self) -> dict:
        """More of the task's state for a checkpoint's trainer state."""
        return {}

    def load_extra_state(self, trainer: dict) -> None:
        """Restore what :meth:`extra_state` saved, from a checkpoint's trainer state."""

    def keep_record(self, rec: dict) -> bool:
        """Whether a metrics record came before the checkpoint the run resumed from (step ``self.step``, phase
        ``self.resumed_phase``): an earlier step, or this step in the checkpoint's phase (a record of the next
        phase at this step, such as the evaluation as it begins, came after the checkpoint)."""
        phase = getattr(self, "resumed_phase", None)
        return rec["step"] < self.step or (rec["step"] == self.step and rec.get("phase", phase) == phase)

    # ------------------------------------------------------------------------------------------- output folder
    def prepare_output(self) -> None:
        """Without ``--resume``: forget an earlier attempt's metrics (the folder itself was claimed, and cleared
        by ``--overwrite``, before the run started: :func:`fastpref.train.folder.claimed`)."""
        self.out.folder.mkdir(parents=True, exist_ok=True)
        if not self.cfg.resume:
            self.out.forget_records()
        self.d.barrier()

    # ------------------------------------------------------------------------------------------- checkpoints
    def model_state(self) -> dict:
        """The full state of the trained model (the model's own keys, also when an Objective wraps it)."""
        module = self.trained()
        state = model_state(module, self.d)
        return strip_objective(state) if isinstance(module, Objective) else state

    def save(self, opt: torch.optim.Optimizer, phase: Phase) -> None:
        """A checkpoint of this step: model, optimizer, RNG, counters and :meth:`extra_state`."""
        state = self.model_state()  # first: under FSDP it also reshards what a forward pass left unsharded
        trainer = {"step": self.step, "phase": phase.name, "optimizer": optim_state(self.trained(), opt, self.d),
                   "world": self.d.world, **self.rng_state(), **self.extra_state()}
        self.out.save_checkpoint(self.step, state, trainer,
                                 {"step": self.step, "phase": phase.name,
                                  "total_steps": self.phases[-1].end})

    def resume(self) -> dict | None:
        """Restore model, RNG and counters from the checkpoint ``--resume`` names; returns its trainer state
        (the optimizer's inside), or None for a fresh start."""
        found = self.out.open_checkpoint(self.cfg.resume)
        if found is None:
            self.out.forget_records()  # starting from scratch: an earlier attempt's records go
            self.d.barrier()
            return None
        folder, mstate, trainer = found
        self.resumed_phase = trainer.get("phase", self.phases[0].name)
        self.load_model_state(mstate, self.resumed_phase)
        self.set_rng_state(trainer)
        self.load_extra_state(trainer)
        self.step = int(trainer["step"])
        self.out.keep_records(self.keep_record)
        self.log(f"resumed from {folder} at step {self.step}/{self.phases[-1].end}")
        return trainer

    # ------------------------------------------------------------------------------------------- the loop
    def train_phases(self, trainer: dict | None) -> tuple[torch.optim.Optimizer, Phase] | None:
        """Train every phase from the current step (``trainer``: the resumed checkpoint's trainer state);
        returns the last (optimizer, phase) that made a step (None when none did)."""
        from tqdm.auto import tqdm

        bar = tqdm(total=self.phases[-1].end, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (self.d.main and getattr(self.cfg, "progress", False)))
        last = None
        for phase in self.phases:
            if phase.steps <= 0 or self.step >= phase.end:
                continue
            bar.set_description(self.describe(phase))
            module = self.module_for(phase)
            opt = self.optimizer(module, phase.lr)
            if trainer is not None and trainer["phase"] == phase.name and self.step > phase.start:
                load_optim_state(self.trained(), opt, trainer["optimizer"], self.d)
            self.begin(phase)
            for rec in self.steps(phase, module, opt, lambda step, m, ph=phase: self.micro_step(ph, step, m)):
                out = self.record(phase, rec)
                if out is not None:
                    self.out.record(out)
                bar.update(1)
                post = {"loss": f"{rec['loss']:.4f}"}
                if "rewards/accuracies" in rec:
                    post["acc"] = f"{rec['rewards/accuracies']:.2f}"
                bar.set_postfix(post, refresh=False)
                every = self.cfg.eval_every
                if every and (self.step - self.count_from(phase)) % every == 0 and self.step < phase.end:
                    self.evaluate_now(phase)
                if self.cfg.save_every and self.step % self.cfg.save_every == 0 and self.step < self.phases[-1].end:
                    self.save(opt, phase)
                last = (opt, phase)
            trainer = None
        bar.close()
        return last
