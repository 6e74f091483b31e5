"""Checks of everything a user gives ``fastpref train`` (flags, YAML settings, paths, numbers, losses, data rows,
the output folder), run before any model is built. Each problem is a :class:`UserError`: one line naming the
flag, file or line and what was expected; the command prints it and exits with status 2.

:func:`check` runs them all on a :class:`~fastpref.train.config.Config`; modes that add settings reuse the
pieces (:func:`check_numbers`, :func:`check_path`, :func:`resolve_losses`, :func:`check_rows`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

EXIT_CODE = 2


class UserError(Exception):
    """A problem with what the user gave (not a bug): reported as one line, exit status 2, no traceback."""


# --------------------------------------------------------------------------------------------------- numbers
# field → (kind, lowest, highest, lowest allowed itself?, highest allowed itself?); None: unbounded.
NUMBERS: dict[str, tuple[type, float | None, float | None, bool, bool]] = {
    "steps": (int, 1, None, True, True), "sft_steps": (int, 0, None, True, True),
    "batch_size": (int, 1, None, True, True), "grad_accum": (int, 1, None, True, True),
    "eval_batch_size": (int, 1, None, True, True), "max_length": (int, 2, None, True, True),
    "max_prompt_length": (int, 1, None, True, True), "pack_length": (int, 0, None, True, True),
    "save_every": (int, 0, None, True, True), "eval_every": (int, 0, None, True, True),
    "log_every": (int, 1, None, True, True), "keep_checkpoints": (int, 1, None, True, True),
    "threads": (int, 1, None, True, True), "seed": (int, 0, None, True, True),
    "synthetic_train": (int, 1, None, True, True), "synthetic_eval": (int, 1, None, True, True),
    "lr": (float, 0, None, False, True), "sft_lr": (float, 0, None, False, True),
    "beta": (float, 0, None, False, True), "max_grad_norm": (float, 0, None, False, True),
    "epochs": (float, 0, None, False, True), "weight_decay": (float, 0, None, True, True),
    "warmup_ratio": (float, 0, 1, True, False), "min_lr_ratio": (float, 0, 1, True, True),
    "eval_fraction": (float, 0, 1, True, False),
}
# the online mode's settings (``fastpref train --online``): its own numbers, and evaluation every N >= 1 rounds
ONLINE_NUMBERS: dict[str, tuple[type, float | None, float | None, bool, bool]] = {
    **NUMBERS, "eval_every": (int, 1, None, True, True), "rounds": (int, 1, None, True, True),
    "samples": (int, 1, None, True, True), "prompts_per_round": (int, 1, None, True, True),
    "max_new_tokens": (int, 1, None, True, True), "gen_batch": (int, 1, None, True, True),
    "temperature": (float, 0, None, False, True), "top_p": (float, 0, 1, False, True),
    "margin": (float, 0, 1, True, True), "mixture_coef": (float, 0, 1, True, True),
    "demo_correct_fraction": (float, 0, 1, True, True), "judge_temperature": (float, 0, None, True, True),
    "judge_timeout": (float, 0, None, False, True),
}


def _expected(kind: type, lo, hi, lo_in: bool, hi_in: bool) -> str:
    what = "a whole number" if kind is int else "a number"
    if lo is not None and hi is not None:
        return f"{what} in {'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"
    if lo is not None:
        return f"{what} {'>=' if lo_in else '>'} {lo:g}"
    return what


def number(name: str, value: Any, where: str, table: dict = NUMBERS) -> int | float:
    """``value`` (a flag's or YAML's; strings such as "1e-4" are read as numbers) checked against ``table``
    (:data:`NUMBERS`, or :data:`ONLINE_NUMBERS`)."""
    kind, lo, hi, lo_in, hi_in = table[name]
    expected = _expected(kind, lo, hi, lo_in, hi_in)
    v = value
    if isinstance(v, str):
        try:
            v = float(v) if kind is float else int(v)
        except ValueError:
            raise UserError(f"{where} {value!r}: expected {expected}") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and v != int(v)) or not math.isfinite(v):
        raise UserError(f"{where} {value!r}: expected {expected}")
    v = kind(v)
    low = lo is not None and (v < lo or (v == lo and not lo_in))
    high = hi is not None and (v > hi or (v == hi and not hi_in))
    if low or high:
        raise UserError(f"{where} {value}: expected {expected}")
    return v


def check_numbers(values: dict[str, Any], where: Callable[[str], str], table: dict = NUMBERS) -> dict[str, Any]:
    """``values`` with every number of ``table`` checked and converted; ``where(field)`` names its flag or YAML
    line."""
    return {k: (number(k, v, where(k), table) if k in table and v is not None else v) for k, v in values.items()}


# ------------------------------------------------------------------------------------------------------ paths
def check_path(flag: str, value: str | None, kind: str) -> None:
    """``kind``: "model" (a local Hugging Face folder with config.json), "tokenizer" (a folder with tokenizer
    files), "data" (a .jsonl/.json/.ndjson/.parquet file or a `datasets` folder), "checkpoint" (a folder)."""
    if value is None:
        return
    p = Path(value)
    if not p.exists():
        hint = " (a local folder is expected: download hub models first)" if kind in ("model", "tokenizer") else ""
        raise UserError(f"{flag} {value}: no such {'file or folder' if kind == 'data' else 'folder'}{hint}")
    if kind == "data":
        if p.is_file() and p.suffix not in (".jsonl", ".json", ".ndjson", ".parquet"):
            raise UserError(f"{flag} {value}: unsupported data file (expected .jsonl, .parquet or a `datasets` "
                            "folder saved to disk)")
        return
    if not p.is_dir():
        raise UserError(f"{flag} {value}: expected a folder, got a file")
    if kind == "model" and not (p / "config.json").is_file():
        raise UserError(f"{flag} {value}: not a Hugging Face model folder (no config.json)")
    if kind == "tokenizer" and not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise UserError(f"{flag} {value}: no tokenizer files (tokenizer.json / tokenizer_config.json) in it")


# ----------------------------------------------------------------------------------------------------- losses
def resolve_losses(weights: dict[str, float], names: list[str]) -> tuple[dict[str, float], list[str]]:
    """Registry names for the loss names given (aliases mapped; case and '-' ignored) and notes on the
    mappings; an unknown name or a weight that is not a finite number > 0 is a UserError (the API's checks,
    :mod:`fastpref.losses.registry`)."""
    from ..losses import registry

    out, notes = {}, []
    for given, w in weights.items():
        try:
            registry.check_weights({given: w})
        except ValueError as e:
            raise UserError(f"--{e}") from None
        try:
            name = registry.resolve(given)
        except ValueError:
            raise UserError(f"--loss {given}: {registry.unknown_name(given)}") from None
        if name not in names:
            raise UserError(f"--loss {given}: {registry.unknown_name(given)}")
        if given.strip().lower().replace("-", "_") in registry.ALIASES:
            notes.append(f"--loss {given}: using the registry's {name!r}")
        out[name] = out.get(name, 0.0) + w
    return out, notes


def check_loss_values(weights: dict[str, float], hparams: dict[str, Any], beta: float | None) -> None:
    """--beta and --loss-args values checked as the losses check them (finite in float32, in range)."""
    from .. import losses

    fns = {n: losses.get(n) for n in weights}
    for key, value in ({**hparams, "beta": beta} if beta is not None else hparams).items():
        try:
            losses.check_values(fns, {key: value})
        except ValueError as e:
            raise UserError(f"--beta {value}: {str(e).split(': ', 1)[1]}" if key == "beta" and key not in hparams
                            else f"--loss-args {e}") from None


# ----------------------------------------------------------------------------------------- device, backend
def check_device(device: str, distributed: str, backend: str) -> None:
    """--device cuda needs a GPU, --distributed ddp/fsdp needs torchrun, --backend NAME must run on the device."""
    import os

    import torch

    if device == "cuda" and not torch.cuda.is_available():
        why = "torch is a CPU build" if torch.version.cuda is None else "no GPU is visible"
        raise UserError(f"--device cuda: CUDA is not available here ({why}); use --device cpu or auto")
    if distributed in ("ddp", "fsdp") and "RANK" not in os.environ:
        raise UserError(f"--distributed {distributed} needs to be launched with torchrun "
                        "(e.g. torchrun --nproc_per_node 2 -m fastpref.train ...)")
    if backend != "auto":
        from ..backends import resolve

        on = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
        try:
            resolve(backend, on, torch.float32)
        except ValueError as e:
            raise UserError(f"--backend {backend}: {e}") from None


# ------------------------------------------------------------------------------------------------------- data
def check_rows(path: str, flag: str, skip_bad_rows: bool) -> None:
    """Read every row of a data file and check its fields (what needs no tokenizer); the first bad row is a
    UserError naming ``file:line`` (with ``skip_bad_rows``: only a file with no good row is)."""
    from . import data as D

    layout, good, bad, first = None, 0, 0, None
    try:
        for where, row in D.read_rows(path):
            try:
                if isinstance(row, D.DataError):
                    raise row
                layout = layout or D.detect_format(row, where)
                D.validate(row, layout, where)
                good += 1
            except D.DataError as e:
                if not skip_bad_rows:
                    raise UserError(f"{flag}: {e}") from None
                bad, first = bad + 1, first or str(e)
    except D.DataError as e:  # the file or folder as a whole (a JSON array, a truncated Parquet file, ...)
        raise UserError(f"{flag}: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{flag} {path}: cannot read it ({e})") from None
    if not good:
        raise UserError(f"{flag} {path}: no usable rows" + (f" ({bad} bad, the first: {first})" if bad else ""))


# -------------------------------------------------------------------------------------------- output folder
RUN_FILES = ("metrics.jsonl", "summary.json", "checkpoints", "final", "reference", "ref_logps.safetensors")


def previous_run(out: Path) -> list[str]:
    """The files of an earlier run in ``out`` (what a new run would replace)."""
    return [f for f in RUN_FILES if (out / f).exists()]


def check_output_dir(output_dir: str, resume: str | None, overwrite: bool) -> None:
    """An output folder that holds a run is never written over silently: --resume or --overwrite must say so."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output-dir {output_dir}: exists and is not a folder")
    found = previous_run(out)
    if found and resume in (None, "", "no") and not overwrite:
        raise UserError(f"--output-dir {output_dir} already holds a run ({', '.join(found)}): continue it with "
                        "--resume auto, replace it with --overwrite, or choose another --output-dir")


# ------------------------------------------------------------------------------------------------ everything
def check(cfg, log: Callable[[str], None] = print):
    """``cfg`` checked (paths, losses and their arguments, data rows, output folder) before anything heavy runs;
    returns it with the loss names resolved to the registry's. Raises UserError."""
    import dataclasses

    from .specs import parse_kv, parse_loss

    for flag, value, kind in (("--model", cfg.model, "model"), ("--ref-model", cfg.ref_model, "model"),
                              ("--prev-model", cfg.prev_model, "model"),
                              ("--token-reward-model", cfg.token_reward_model, "model"),
                              ("--tokenizer", cfg.tokenizer, "tokenizer"), ("--data", cfg.data, "data"),
                              ("--eval-data", cfg.eval_data, "data")):
        check_path(flag, value, kind)
    if cfg.eval_data and not cfg.data:
        raise UserError("--eval-data needs --data (the demo task brings its own held-out prompts)")
    if cfg.resume not in (None, "", "no", "auto"):
        check_path("--resume", cfg.resume, "checkpoint")
    check_device(cfg.device, cfg.distributed, cfg.backend)
    try:
        weights, hparams = parse_loss(cfg.loss), parse_kv(cfg.loss_args)
    except ValueError as e:
        raise UserError(str(e)) from None
    from .. import losses
    from ..nn import loss_params

    weights, notes = resolve_losses(weights, losses.names())
    for note in notes:
        log(note)
    accepted = set().union(*(loss_params(losses.get(n)) for n in weights))
    for key in hparams:
        if key not in accepted:
            raise UserError(f"--loss-args {key}: not a parameter of {', '.join(weights)}")
    check_loss_values(weights, hparams, cfg.beta)
    check_output_dir(cfg.output_dir, cfg.resume, cfg.overwrite)
    for flag, path in (("--data", cfg.data), ("--eval-data", cfg.eval_data)):
        if path and cfg.task != "reward":  # reward data (score rows too): reward.load
            check_rows(path, flag, cfg.skip_bad_rows)
    return dataclasses.replace(cfg, loss=weights)
