"""Everything a run writes into its output folder, in one place: ``metrics.jsonl`` (one JSON record a line),
``checkpoints/step-XXXXXXXX`` (see :mod:`fastpref.train.checkpoint`), ``final/`` (the model and tokenizer,
``from_pretrained``-loadable), ``summary.json``, the plots, caches and round files. Only the main process
writes; every method that writes is called on all ranks and ends with a barrier where other ranks must wait for
the file.

Every file is written under a temporary name and renamed into place (``final/`` as a whole folder), so a run
that dies, or a full disk, leaves the previous state intact; a failed write ends the run with one line. Each
top-level entry is listed in ``run.json`` before it is written (what ``--overwrite`` may remove, see
:mod:`fastpref.train.folder`). JSON output holds no bare NaN or infinity (they are written as null).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from torch import Tensor, nn

from . import checkpoint as C
from . import folder as F
from .atomic import finite, json_sha256, tensors_sha256, writing  # noqa: F401  (finite, writing: re-exported)
from .checkpoint_files import CheckpointFiles
from .dist import Dist
from .records import MetricRecords


class Outputs(MetricRecords, CheckpointFiles):
    """The output folder of one run (``folder``), for the process ``d``; ``log`` prints on the main process;
    ``identity`` (:func:`fastpref.train.folder.identity`) goes into every checkpoint and is checked on resume
    (the settings in ``allow`` may differ: ``--resume-allow``)."""

    def __init__(self, folder: str | Path, d: Dist, keep_checkpoints: int, log: Callable[..., None],
                 identity: dict | None = None, allow: set[str] = frozenset()):
        self.folder = Path(folder)
        self.allow = allow
        self.d, self.keep, self.log = d, keep_checkpoints, log
        self.identity = identity
        self.metrics = self.folder / "metrics.jsonl"
        self.checkpoints = self.folder / "checkpoints"
        rec = F.read_run(self.folder) if d.main else None
        self.owned: set[str] = set(rec.get("files", [])) if rec else set()

    def own(self, path: Path) -> None:
        """List the top-level entry that ``path`` lies in among the run's own files (run.json), before it is
        written (main process)."""
        name = Path(path).relative_to(self.folder).parts[0]
        if not self.d.main or name in self.owned:
            return
        rec = F.read_run(self.folder) or {**(self.identity or {}), "files": []}
        rec["files"] = sorted(set(rec.get("files", [])) | {name})
        F.write_run(self.folder, rec)
        self.owned.add(name)

    # ------------------------------------------------------------------------------------------- other files
    def replace_text(self, path: Path, text: str) -> None:
        """Write ``text`` to ``path`` through a temporary file renamed into place (main process)."""
        self.own(path)
        tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
        with writing(path, tmp):
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)

    def write_json(self, path: Path, obj: Any, wait: bool = True, indent: int | None = None,
                   checksum: bool = False) -> None:
        """Write ``obj`` as JSON to ``path`` (inside the folder) atomically: a temporary file renamed into place.
        ``wait``: the other ranks wait for it (False: called on the main process only); ``checksum``: ``obj`` (a
        mapping: data a resumed run reads back, written as it is) gets the key "sha256" of its contents, which
        :meth:`read_json` verifies; otherwise non-finite numbers are written as null."""
        if self.d.main:
            obj = {**obj, "sha256": json_sha256(obj)} if checksum else finite(obj)
            self.replace_text(path, json.dumps(obj, indent=indent))
        if wait:
            self.d.barrier()

    @staticmethod
    def read_json(path: Path) -> Any:
        """The JSON of ``path``; a file written with a checksum must match it (CheckpointError otherwise)."""
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise C.CheckpointError(f"{path}: unreadable ({e})") from None
        if isinstance(obj, dict) and "sha256" in obj:
            rest = {k: v for k, v in obj.items() if k != "sha256"}
            if json_sha256(rest) != obj["sha256"]:
                raise C.CheckpointError(f"{path}: sha256 does not match its contents (damaged or altered)")
            obj = rest
        return obj

    def save_weights(self, name: str, state: dict[str, Tensor], info: dict) -> None:
        """A verified weights folder ``<name>/`` (the checkpoint format, no trainer state), e.g. the reference."""
        if self.d.main:
            self.own(self.folder / name)
            with writing(self.folder / name):
                C.write(self.folder / name, state, {}, info)
        self.d.barrier()

    def read_weights(self, name: str) -> dict[str, Tensor]:
        """The weights of a folder written by :meth:`save_weights` (verified first)."""
        return C.read(self.folder / name)[0]

    def cached_tensors(self, name: str, key: str) -> dict[str, Tensor] | None:
        """The tensors of ``<name>.safetensors`` if it was written with this ``key`` and its checksum holds, else
        None (a cache that does not read or verify is reported, and computed again)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = self.folder / f"{name}.safetensors"
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            if meta.get("key") != key:
                return None
            tensors = load_file(str(path))
            if meta.get("sha256") != tensors_sha256(tensors):
                raise ValueError("checksum does not match its contents")
        except Exception as e:  # noqa: BLE001 - a truncated or altered cache is computed again
            self.log(f"refusing the cache {path} ({e}); computing it again")
            return None
        return tensors

    def cache_tensors(self, name: str, tensors: dict[str, Tensor], key: str) -> None:
        """Write ``<name>.safetensors`` (through a temporary file) with ``key`` and the tensors' sha256 in its
        metadata."""
        if self.d.main:
            from safetensors.torch import save_file

            path = self.folder / f"{name}.safetensors"
            self.own(path)
            tmp = path.with_suffix(".tmp")
            with writing(path, tmp):
                save_file(tensors, str(tmp), metadata={"key": key, "sha256": tensors_sha256(tensors)})
                tmp.replace(path)
        self.d.barrier()

    # ------------------------------------------------------------------------------------------- the end
    def save_final(self, model: nn.Module, tokenizer, state: dict[str, Tensor] | None = None) -> Path:
        """``final/``: ``model.save_pretrained`` (with ``state`` as its weights when given) and the tokenizer,
        written to a temporary folder that then replaces the previous ``final/``."""
        final = self.folder / "final"
        if self.d.main:
            self.own(final)
            tmp, old = final.with_name(f".tmp-final-{os.getpid()}"), final.with_name(f".old-final-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            with writing(final, tmp):
                model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
                tokenizer.save_pretrained(str(tmp))
                if final.exists():
                    os.replace(final, old)
                os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        return final

    def save_summary(self, summary: dict, plot: Callable[[Path, Path], Any] | None = None) -> None:
        """``summary.json``, and the plots of metrics.jsonl drawn by ``plot(metrics file, folder)`` (drawn in a
        temporary folder, each renamed into place)."""
        if not self.d.main:
            return
        self.write_json(self.folder / "summary.json", summary, wait=False, indent=1)
        if plot is None:
            return
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-plots-", dir=self.folder))
        with writing(self.folder / "plots", tmp):
            plot(self.metrics, tmp)
            for p in sorted(tmp.iterdir()):
                self.own(self.folder / p.name)
                os.replace(p, self.folder / p.name)
        shutil.rmtree(tmp, ignore_errors=True)
