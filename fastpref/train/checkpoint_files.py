"""The checkpoints of a run in its output folder (``checkpoints/step-XXXXXXXX``, see
:mod:`fastpref.train.checkpoint`): written atomically with the run's identity, pruned to the newest ones, and on
resume refused with their reason when unreadable or written by another run (the previous one tried then). A part
of :class:`~fastpref.train.outputs.Outputs` (it uses the folder's ``checkpoints`` path, ``d``, ``keep``, ``log``,
``identity``, ``allow`` and ``own``)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from torch import Tensor

from . import checkpoint as C
from . import folder as F
from .atomic import writing


class CheckpointFiles:
    """The checkpoint methods of :class:`~fastpref.train.outputs.Outputs`."""

    def save_checkpoint(self, step: int, model_state: dict[str, Tensor], trainer_state: dict[str, Any],
                        info: dict) -> None:
        """Write ``checkpoints/step-<step>`` (atomically; the newest ``keep_checkpoints`` are kept). ``info``
        gets the wall-clock time and the run's identity added."""
        if self.d.main:
            self.own(self.checkpoints)
            target = self.checkpoints / f"step-{step:08d}"
            with writing(target):
                folder = C.write(target, model_state, trainer_state,
                                 {**info, "time": time.time(), "run": self.identity})
            C.prune(self.checkpoints, self.keep, protect=folder)
        self.d.barrier()

    def check_identity(self, folder: Path, info: dict) -> None:
        """Refuse (CheckpointError) a checkpoint written by a run of another task or with other settings."""
        if self.identity is None:
            return
        run = info.get("run")
        if not isinstance(run, dict):
            raise C.CheckpointError(f"{folder}: records no run settings (written by an older fastpref)")
        diffs = F.differences(run, self.identity, self.allow)
        if diffs:
            raise C.CheckpointError(f"{folder}: written by {F.article(str(run.get('task')))} run with other settings: "
                                    f"{'; '.join(diffs)}")

    def open_checkpoint(self, resume: str | None) -> tuple[Path, dict[str, Tensor], dict[str, Any]] | None:
        """(folder, model state, trainer state) of the checkpoint to resume from: ``resume`` "auto" (the newest
        one that reads and belongs to this run: each one refused is reported with its reason and the previous
        one tried; None, with a note, when there is none) or a folder (one that does not read ends the run with
        a one-line message); None for no resume."""
        if resume in (None, "", "no"):
            return None
        candidates = list(reversed(C.step_folders(self.checkpoints))) if resume == "auto" else [Path(resume)]
        for folder in candidates:
            try:
                model_state, trainer_state, info = C.read(folder)
                self.check_identity(folder, info)
                return folder, model_state, trainer_state
            except Exception as e:  # noqa: BLE001 - whatever makes a checkpoint unreadable refuses it
                why = str(e) if isinstance(e, C.CheckpointError) else f"{folder}: unreadable ({type(e).__name__}: {e})"
                if resume != "auto":
                    raise SystemExit(f"cannot resume: {why}") from None
                self.log(f"refusing checkpoint {folder}: {why}")
        self.log(f"--resume auto: no valid checkpoint in {self.checkpoints}; starting from scratch")
        return None
