"""Everything a run writes into its output folder, in one place: ``metrics.jsonl`` (one JSON record a line),
``checkpoints/step-XXXXXXXX`` (see :mod:`fastpref.train.checkpoint`), ``final/`` (the model and tokenizer,
``from_pretrained``-loadable), ``summary.json`` and the plots. Only the main process writes; every method
that writes is called on all ranks and ends with a barrier where other ranks must wait for the file.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from torch import Tensor, nn

from . import checkpoint as C
from .dist import Dist


class Outputs:
    """The output folder of one run (``folder``), for the process ``d``; ``log`` prints on the main process."""

    def __init__(self, folder: str | Path, d: Dist, keep_checkpoints: int, log: Callable[..., None]):
        self.folder = Path(folder)
        self.d, self.keep, self.log = d, keep_checkpoints, log
        self.metrics = self.folder / "metrics.jsonl"
        self.checkpoints = self.folder / "checkpoints"

    # ------------------------------------------------------------------------------------------- metrics
    def record(self, rec: dict) -> None:
        """Append one record to metrics.jsonl."""
        if self.d.main:
            with open(self.metrics, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")

    def records(self) -> list[dict]:
        """The records of metrics.jsonl so far ([] without the file)."""
        if not self.metrics.is_file():
            return []
        return [json.loads(x) for x in self.metrics.read_text().splitlines() if x.strip()]

    def find_record(self, match: Callable[[dict], bool]) -> dict | None:
        """The first record of metrics.jsonl that ``match`` accepts (main process; None elsewhere or when none
        does)."""
        if not self.d.main:
            return None
        return next((r for r in self.records() if match(r)), None)

    def keep_records(self, keep: Callable[[dict], bool]) -> list[dict]:
        """Rewrite metrics.jsonl with only the records ``keep`` accepts (those written before the checkpoint a
        run resumes from); returns them (main process; [] elsewhere)."""
        if not (self.d.main and self.metrics.is_file()):
            return []
        kept = [r for r in self.records() if keep(r)]
        self.metrics.write_text("".join(json.dumps(r) + "\n" for r in kept))
        return kept

    def forget_records(self) -> None:
        """Delete metrics.jsonl (a fresh run in a folder that has an earlier run's records)."""
        if self.d.main:
            self.metrics.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, step: int, model_state: dict[str, Tensor], trainer_state: dict[str, Any],
                        info: dict) -> None:
        """Write ``checkpoints/step-<step>`` (atomically; the newest ``keep_checkpoints`` are kept). ``info``
        gets the wall-clock time added."""
        if self.d.main:
            folder = C.write(self.checkpoints / f"step-{step:08d}", model_state, trainer_state,
                             {**info, "time": time.time()})
            C.prune(self.checkpoints, self.keep, protect=folder)
        self.d.barrier()

    def open_checkpoint(self, resume: str | None) -> tuple[Path, dict[str, Tensor], dict[str, Any]] | None:
        """(folder, model state, trainer state) of the checkpoint to resume from: ``resume`` "auto" (the newest
        valid one under checkpoints/; None, with a note, when there is none) or a folder; None for no resume.
        A checkpoint that does not verify ends the run with a one-line message."""
        if resume in (None, "", "no"):
            return None
        folder = C.latest_valid(self.checkpoints, warn=self.log) if resume == "auto" else Path(resume)
        if folder is None:
            self.log(f"--resume auto: no valid checkpoint in {self.checkpoints}; starting from scratch")
            return None
        try:
            model_state, trainer_state, _ = C.read(folder)
        except C.CheckpointError as e:
            raise SystemExit(f"cannot resume: {e}") from None
        return folder, model_state, trainer_state

    # ------------------------------------------------------------------------------------------- other files
    def write_json(self, path: Path, obj: Any, wait: bool = True) -> None:
        """Write ``obj`` as JSON to ``path`` (inside the folder) atomically: a temporary file renamed into place.
        ``wait``: the other ranks wait for it (False: called on the main process only)."""
        if self.d.main:
            tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
            tmp.write_text(json.dumps(obj))
            os.replace(tmp, path)
        if wait:
            self.d.barrier()

    def save_weights(self, name: str, state: dict[str, Tensor], info: dict) -> None:
        """A verified weights folder ``<name>/`` (the checkpoint format, no trainer state), e.g. the reference."""
        if self.d.main:
            C.write(self.folder / name, state, {}, info)
        self.d.barrier()

    def read_weights(self, name: str) -> dict[str, Tensor]:
        """The weights of a folder written by :meth:`save_weights` (verified first)."""
        return C.read(self.folder / name)[0]

    def cached_tensors(self, name: str, key: str) -> dict[str, Tensor] | None:
        """The tensors of ``<name>.safetensors`` if it was written with this ``key``, else None."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = self.folder / f"{name}.safetensors"
        if not path.is_file():
            return None
        with safe_open(str(path), "pt") as f:
            same = (f.metadata() or {}).get("key") == key
        return load_file(str(path)) if same else None

    def cache_tensors(self, name: str, tensors: dict[str, Tensor], key: str) -> None:
        """Write ``<name>.safetensors`` (through a temporary file) with ``key`` in its metadata."""
        if self.d.main:
            from safetensors.torch import save_file

            path = self.folder / f"{name}.safetensors"
            tmp = path.with_suffix(".tmp")
            save_file(tensors, str(tmp), metadata={"key": key})
            tmp.replace(path)
        self.d.barrier()

    # ------------------------------------------------------------------------------------------- the end
    def save_final(self, model: nn.Module, tokenizer, state: dict[str, Tensor] | None = None) -> Path:
        """``final/``: ``model.save_pretrained`` (with ``state`` as its weights when given) and the tokenizer."""
        final = self.folder / "final"
        if self.d.main:
            model.save_pretrained(str(final), state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(str(final))
        return final

    def save_summary(self, summary: dict, plot: Callable[[Path, Path], Any] | None = None) -> None:
        """``summary.json``, and the plots of metrics.jsonl drawn by ``plot(metrics file, folder)``."""
        if self.d.main:
            (self.folder / "summary.json").write_text(json.dumps(summary, indent=1))
            if plot is not None:
                plot(self.metrics, self.folder)
