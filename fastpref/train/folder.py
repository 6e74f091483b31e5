"""The output folder as a transaction: one run at a time, one rule for every task, and nothing removed that
fastpref did not write.

* :func:`claimed` (around a task's whole run, on the main process): the folder must be usable (a folder we can
  write, or one we can create); the run takes an exclusive lock on it (``.fastpref.lock``, released when the
  process ends, even by SIGKILL; a second run is refused with the holder's pid, host and start time); then the
  rule: an empty folder starts a run; a folder holding a run continues it only with ``--resume`` and only when
  the task, settings, data and versions match (:func:`identity`; the differences are listed otherwise); anything
  else is refused with the choices. ``--overwrite`` removes only the entries listed in ``run.json`` (the
  manifest of what fastpref wrote), and refuses while an input (``--model``, ``--data``, …) lies inside one.
* ``run.json``: the run's identity and its own top-level entries (:class:`~fastpref.train.outputs.Outputs`
  adds each entry before writing it).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Iterator

RUN_FILE = "run.json"
LOCK_FILE = ".fastpref.lock"
# What a folder written before run.json existed may hold (removed by --overwrite there; nothing else is).
LEGACY = ("metrics.jsonl", "summary.json", "checkpoints", "final", "reference", "ref_logps.safetensors", "rounds",
          "sft")
# Settings that may differ on --resume: where and how the run is written and watched, and the hardware it runs on.
BOOKKEEPING = frozenset({"output_dir", "resume", "resume_allow", "overwrite", "progress", "plots", "threads",
                         "keep_checkpoints", "save_every", "device", "config"})
# Settings that --resume-allow may let differ: how long the run trains (more steps or rounds continue it; its
# learning-rate schedule then stretches from the resumed step on) and what it evaluates and logs.
MAY_CHANGE = ("steps", "epochs", "rounds", "eval_every", "log_every")
DATA = ("data", "eval_data", "prompts", "eval_prompts")  # files whose contents are part of the identity
INPUTS = ("model", "ref_model", "tokenizer", "prev_model", "token_reward_model", "judge", *DATA)
VERSIONS = ("fastpref", "torch", "transformers")

_digests: dict[tuple, str] = {}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def article(word: str) -> str:
    """``word`` with its indefinite article ("an online", "a reward")."""
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


def digest(path: str | Path) -> str:
    """sha256 of a file, or of a folder's files (relative names and contents); cached per (path, size, mtime)."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
    key = tuple((str(q.resolve()), q.stat().st_size, q.stat().st_mtime_ns) for q in files)
    if key not in _digests:
        h = hashlib.sha256()
        for q in files:
            h.update(str(q.relative_to(p)).encode() if q != p else b"")
            with open(q, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        _digests[key] = h.hexdigest()
    return _digests[key]


def versions() -> dict[str, str | None]:
    """The versions of the packages that compute a run's numbers."""
    out: dict[str, str | None] = {}
    for name in VERSIONS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def identity(task: str, cfg: Any) -> dict:
    """What a resumed run must share with the run it continues: the task, every setting but the bookkeeping
    ones, the digests of the data files and the package versions (JSON-normalised)."""
    settings = {k: v for k, v in sorted(dataclasses.asdict(cfg).items()) if k not in BOOKKEEPING}
    data = {k: digest(getattr(cfg, k)) for k in DATA if getattr(cfg, k, None) and Path(getattr(cfg, k)).exists()}
    return json.loads(json.dumps({"task": task, "settings": settings, "data": data, "versions": versions()},
                                 default=str))


def allowed(cfg: Any) -> set[str]:
    """The settings ``--resume-allow`` lets differ (a name outside :data:`MAY_CHANGE` is refused, one line)."""
    names = {n.strip().replace("-", "_") for n in (getattr(cfg, "resume_allow", None) or "").split(",") if n.strip()}
    bad = sorted(names - set(MAY_CHANGE))
    if bad:
        raise SystemExit(f"--resume-allow {','.join(bad)}: only {', '.join(MAY_CHANGE)} may differ from the resumed "
                         "run's settings")
    return names


def differences(old: dict, new: dict, allow: set[str] = frozenset()) -> list[str]:
    """The differences between two identities, one phrase each ("--lr 0.001 → 0.002"), the settings in
    ``allow`` aside; [] when they match."""
    if old.get("task") != new.get("task"):
        return [f"task {old.get('task')} → {new.get('task')}"]
    out = []
    for group, name in (("settings", _flag), ("data", lambda k: f"{_flag(k)} contents"),
                        ("versions", lambda k: k)):
        a, b = old.get(group) or {}, new.get(group) or {}
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k) and not (group == "settings" and k in allow):
                shown = (lambda v: (v or "none")[:12]) if group == "data" else (lambda v: v)
                out.append(f"{name(k)} {shown(a.get(k))} → {shown(b.get(k))}")
    return out


# --------------------------------------------------------------------------------------------- run.json
def read_run(folder: Path) -> dict | None:
    """The folder's run.json (None without one, or when it cannot be read)."""
    try:
        rec = json.loads((Path(folder) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def write_run(folder: Path, rec: dict) -> None:
    """Write run.json atomically (a temporary file renamed into place)."""
    path = Path(folder) / RUN_FILE
    tmp = path.with_name(f".tmp-{RUN_FILE}-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(rec, indent=1))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise SystemExit(f"cannot write {path}: {e.strerror or e}") from None


def own_entries(folder: Path) -> list[str]:
    """The top-level entries of the folder that fastpref wrote and that exist (run.json and the lock aside)."""
    rec = read_run(folder)
    names = rec.get("files", []) if rec is not None else [n for n in LEGACY]
    return [n for n in names if n not in (RUN_FILE, LOCK_FILE) and
            ((folder / n).exists() or (folder / n).is_symlink())]


# --------------------------------------------------------------------------------------------- the rule
def usable(output_dir: str) -> Path:
    """The output folder, created if needed, after checking that it can be written; one line otherwise."""
    p = Path(output_dir)
    if (p.exists() or p.is_symlink()) and not p.is_dir():
        kind = "a broken or looping link" if p.is_symlink() else "a file"
        raise SystemExit(f"--output-dir {output_dir}: is {kind}, not a folder")
    probe = p / f".probe-{os.getpid()}"
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise SystemExit(f"--output-dir {output_dir}: cannot create or write it ({e.strerror or e})") from None
    return p


def lock(folder: Path):
    """Hold the folder's exclusive lock (an open file; closing it, or the process ending, releases it)."""
    import fcntl

    f = open(folder / LOCK_FILE, "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = ""
        for _ in range(20):  # the holder writes its line right after locking
            f.seek(0)
            holder = f.read().strip()
            if holder:
                break
            time.sleep(0.05)
        f.close()
        raise SystemExit(f"--output-dir {folder} is in use by another run ({holder or 'holder unknown'}): wait "
                         "for it to end or choose another --output-dir") from None
    f.seek(0)
    f.truncate()
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {started}")
    f.flush()
    return f


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_inputs(cfg: Any, folder: Path, entries: list[str]) -> None:
    """Refuse --overwrite while an input of this run lies inside an entry it would remove."""
    for name in INPUTS:
        value = getattr(cfg, name, None)
        if not isinstance(value, str) or not value:
            continue
        path = Path(value).resolve()
        for entry in entries:
            if _inside(path, (folder / entry).resolve()):
                raise SystemExit(f"{_flag(name)} {value} lies inside {folder / entry}, which --overwrite would "
                                 "delete: copy it out of --output-dir first")


def remove(folder: Path, entries: list[str]) -> None:
    """Delete the listed entries of the folder (fastpref's own)."""
    for entry in entries:
        p = folder / entry
        try:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        except OSError as e:
            raise SystemExit(f"--overwrite: cannot remove {p} ({e.strerror or e})") from None


def sweep(folder: Path) -> None:
    """Remove what a killed run left under temporary names (``.tmp-*``, ``.old-*``, in the folder and in
    ``checkpoints/``); only the lock holder calls it, so no other run is writing them."""
    for where in (folder, folder / "checkpoints"):
        for pattern in (".tmp-*", ".old-*"):
            for p in where.glob(pattern) if where.is_dir() else []:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def decide(folder: Path, cfg: Any, ident: dict) -> bool:
    """The one rule (see the module docstring); writes run.json for a run that starts afresh. Returns whether it
    did (False: a run continues)."""
    entries = own_entries(folder)
    rec = read_run(folder)
    resume = cfg.resume not in (None, "", "no")
    where = f"--output-dir {cfg.output_dir}"
    if entries and resume:
        if rec is None:
            raise SystemExit(f"{where} holds a run without {RUN_FILE} (an older fastpref's): its settings cannot "
                             "be checked, so it cannot be resumed; replace it with --overwrite or choose another "
                             "--output-dir")
        if rec.get("task") != ident["task"]:
            raise SystemExit(f"--resume: {where} holds {article(str(rec.get('task')))} run, not "
                             f"{article(ident['task'])} run: replace it with --overwrite or choose another "
                             "--output-dir")
        diffs = differences(rec, ident, allowed(cfg))
        if diffs:
            raise SystemExit(f"--resume: {where} holds {article(str(rec.get('task')))} run with other settings: "
                             f"{'; '.join(diffs)} (run it with its settings, replace it with --overwrite, or "
                             "choose another --output-dir)")
        if differences(rec, ident):  # allowed changes: the run goes on with the new settings
            write_run(folder, {**ident, "files": rec.get("files", [])})
        return False
    if entries and not getattr(cfg, "overwrite", False):
        what = article(f"{rec.get('task')} run") if rec else "a run"
        raise SystemExit(f"{where} already holds {what} ({', '.join(entries)}): continue it with --resume "
                         "auto, replace it with --overwrite, or choose another --output-dir")
    if entries:
        check_inputs(cfg, folder, entries)
        remove(folder, entries)
    write_run(folder, {**ident, "files": []})
    return True


@contextlib.contextmanager
def claimed(cfg: Any, task: str) -> Iterator[None]:
    """Hold ``cfg.output_dir`` for the run of ``task`` inside the block (see the module docstring). A run that
    fails before writing anything leaves the folder as it found it. Under torchrun only rank 0 claims the
    folder."""
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    existed = Path(cfg.output_dir).is_dir()
    folder = usable(cfg.output_dir)
    had_lock = (folder / LOCK_FILE).exists()
    held = lock(folder)
    fresh = False
    try:
        fresh = decide(folder, cfg, identity(task, cfg))
        sweep(folder)
        yield
    except BaseException:  # refused (or failed) before writing anything: nothing of this run stays
        if fresh and not own_entries(folder):
            (folder / RUN_FILE).unlink(missing_ok=True)
        if not had_lock and not (folder / RUN_FILE).exists():
            (folder / LOCK_FILE).unlink(missing_ok=True)
        if not existed:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    finally:
        held.close()
