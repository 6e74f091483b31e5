"""Checkpoints that are safe to load and hard to corrupt.

A checkpoint is a folder written under a temporary name and renamed into place (atomic), holding
``model.safetensors`` (policy weights), ``trainer_state.pt`` (optimizer, RNG, counters; read with
``torch.load(weights_only=True)``, so no pickled code runs) and ``manifest.json`` with the sha256 and size
of every file. Loading verifies the manifest first; a truncated or tampered checkpoint is refused.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete, truncated or altered."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _write_files(tmp: Path, model_state: dict[str, Tensor], trainer_state: dict[str, Any], info: dict) -> None:
    """The checkpoint's files and manifest in the new folder ``tmp``, synced to disk."""
    from safetensors.torch import save_file

    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
    try:
        torch.save(trainer_state, tmp / "trainer_state.pt")
    except RuntimeError as e:  # torch reports a failed write (a full disk) as a RuntimeError
        if shutil.disk_usage(tmp).free < (1 << 20):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from e
        raise
    (tmp / "info.json").write_text(json.dumps(info, indent=1))
    files = {p.name: {"sha256": sha256(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())}
    (tmp / MANIFEST).write_text(json.dumps({"format": "fastpref-checkpoint-1", "files": files}, indent=1))
    for p in tmp.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(tmp)


def write(folder: Path, model_state: dict[str, Tensor], trainer_state: dict[str, Any], info: dict) -> Path:
    """Write a checkpoint folder atomically (temp folder + fsync + rename). Returns its path."""
    folder = Path(folder)
    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_files(tmp, model_state, trainer_state, info)
    except BaseException:  # a full disk, an interrupt: nothing half-written stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if folder.exists():  # re-writing the same step (e.g. after a resume): replace the old copy last
        old = folder.with_name(f".old-{folder.name}-{os.getpid()}")
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)
    _fsync_dir(folder.parent)
    return folder


def verify(folder: Path) -> dict:
    """The manifest, after checking every listed file's size and sha256 (CheckpointError otherwise)."""
    folder = Path(folder)
    mf = folder / MANIFEST
    if not mf.is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST} (incomplete checkpoint)")
    try:
        manifest = json.loads(mf.read_text())
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not a mapping")
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{mf}: unreadable manifest ({e})") from None
    for name in ("model.safetensors", "trainer_state.pt"):
        if name not in files:
            raise CheckpointError(f"{folder}: manifest does not list {name}")
    for name, meta in files.items():
        p = folder / name
        if not isinstance(meta, dict) or not isinstance(meta.get("bytes"), int) or \
                not isinstance(meta.get("sha256"), str):
            raise CheckpointError(f"{mf}: unreadable manifest (the entry of {name} lacks its size or sha256)")
        if not p.is_file():
            raise CheckpointError(f"{p}: missing")
        if p.stat().st_size != meta["bytes"]:
            raise CheckpointError(f"{p}: {p.stat().st_size} bytes, manifest says {meta['bytes']} (truncated?)")
        if sha256(p) != meta["sha256"]:
            raise CheckpointError(f"{p}: sha256 does not match the manifest (corrupted or tampered)")
    return manifest


def read(folder: Path) -> tuple[dict[str, Tensor], dict[str, Any], dict]:
    """(model state, trainer state, info) of a verified checkpoint. No pickled code is executed."""
    from safetensors.torch import load_file

    folder = Path(folder)
    verify(folder)
    model_state = load_file(str(folder / "model.safetensors"))
    trainer_state = torch.load(folder / "trainer_state.pt", weights_only=True, map_location="cpu")
    info = json.loads((folder / "info.json").read_text())
    return model_state, trainer_state, info


def step_folders(root: Path) -> list[Path]:
    """Checkpoint folders ``step-XXXXXXXX`` under root, oldest first (temporary folders excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def latest_valid(root: Path, warn=print) -> Path | None:
    """The newest checkpoint that verifies; refused ones are reported (and left on disk for inspection)."""
    for folder in reversed(step_folders(root)):
        try:
            verify(folder)
            return folder
        except CheckpointError as e:
            warn(f"refusing checkpoint {folder}: {e}")
    return None


def prune(root: Path, keep: int, protect: Path | None = None) -> None:
    """Delete all but the newest ``keep`` checkpoints (by step; ``protect``, the one just written, stays)."""
    folders = step_folders(root)
    for f in folders[: max(0, len(folders) - max(keep, 1))]:
        if protect is None or f.resolve() != Path(protect).resolve():
            shutil.rmtree(f, ignore_errors=True)
