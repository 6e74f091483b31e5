"""What an online run starts from: its prompts (training and held-out, as token ids and as the text the judge
reads) and its starting policy (``--model``, or the demo's warmed-up tiny model)."""
from __future__ import annotations

import shutil

import torch
from torch import nn

from .. import data as D
from ..dist import Dist
from ..evaluate import prompt_ids, prompt_text
from ..model import load_model, tiny_model
from ..outputs import Outputs
from .config import OnlineConfig

Prompt = tuple[list[int], str]  # (token ids as training sees them, the prompt text the judge reads)


def encode(tok, prompt) -> Prompt:
    """(token ids as training sees them, the prompt text the judge reads)."""
    return prompt_ids(tok, prompt), prompt_text(tok, prompt)


Teachers = list[list[int]] | None  # the teacher's answer of every training prompt, as completion token ids

TEACHER_FIELDS = ("teacher", "reference", "chosen")  # where a prompts file may carry a reference answer


def read_prompt_rows(path: str) -> list[tuple[str, dict]]:
    """(location, row) of every row of a JSONL / JSON / Parquet file; each row has a ``prompt`` field (text or
    chat messages)."""
    out = []
    for where, row in D.read_rows(path):
        if isinstance(row, D.DataError):
            raise SystemExit(str(row))
        if not isinstance(row, dict) or "prompt" not in row:
            raise SystemExit(f"{where}: expected a row with a 'prompt' field")
        try:  # text or chat messages, as in the offline data
            prompt = D._text_or_messages(row, "prompt", where)
        except D.DataError as e:
            raise SystemExit(str(e)) from None
        out.append((where, {**row, "prompt": prompt}))
    if not out:
        raise SystemExit(f"{path}: no prompts")
    return out


def read_prompts(path: str) -> list:
    """The ``prompt`` field of every row of a JSONL / JSON / Parquet file (text or chat messages)."""
    return [row["prompt"] for _, row in read_prompt_rows(path)]


def teacher_answers(rows: list[tuple[str, dict]], tok, wanted: bool | None) -> Teachers:
    """The teacher's answer to every prompt as completion token ids (EOS included, as the offline trainer
    tokenizes a completion), from the first of the fields ``teacher``, ``reference``, ``chosen`` that the rows
    carry; None when the data has none. ``wanted``: True refuses data without one, False gives None."""
    if wanted is False:
        return None
    field = next((f for f in TEACHER_FIELDS if f in rows[0][1]), None)
    if field is None:
        if wanted:
            raise SystemExit(f"--teacher: the prompts carry no teacher answer (a field "
                             f"{', '.join(repr(f) for f in TEACHER_FIELDS)}); drop --teacher")
        return None
    tokenize = D.Tokenize(tok, max_length=1 << 30)
    out = []
    for where, row in rows:
        try:
            answer = D._text_or_messages(row, field, where)
            out.append(tokenize.ids(row["prompt"], answer, where)[1])
        except D.DataError as e:
            raise SystemExit(f"{e} (the teacher answer; --no-teacher leaves it out)") from None
    return out


def load_prompts(cfg: OnlineConfig, tok, teacher: bool = False) -> tuple[list[Prompt], list[Prompt], Teachers]:
    """(training prompts, held-out prompts, the training prompts' teacher answers or None): the synthetic task's
    (its teacher answer is the correct one, ``chosen``), or --prompts and --eval-prompts (default: the first 64
    training prompts). ``teacher``: whether the algorithm puts a teacher answer among its candidates (DNO);
    ``cfg.teacher`` then turns it off (False) or requires it (True)."""
    if cfg.synthetic:
        from ..synthetic import make_task

        rows, held = make_task(cfg.synthetic_train, cfg.synthetic_eval)
        train = [("synthetic task", r) for r in rows]
        ev = [r["prompt"] for r in held]
    else:
        train = read_prompt_rows(cfg.prompts)
        ev = read_prompts(cfg.eval_prompts) if cfg.eval_prompts else [r["prompt"] for _, r in train[:64]]
    teachers = teacher_answers(train, tok, cfg.teacher) if teacher else None
    return [encode(tok, r["prompt"]) for _, r in train], [encode(tok, p) for p in ev], teachers


def starting_policy(cfg: OnlineConfig, tok, out: Outputs, d: Dist) -> nn.Module:
    """--model, or the tiny demo model after a short SFT warm-up on mixed-quality demonstrations (the preference
    task's SFT phase, run once into ``sft/`` of the output folder ``out``; synthetic task only; see ``demo.py``)."""
    if cfg.model is not None:
        return load_model(cfg.model)
    with torch.random.fork_rng(devices=[]):
        model = tiny_model(len(tok), cfg.seed)
    if cfg.sft_steps and cfg.synthetic:
        from .demo import warm_up

        sft = out.folder / "sft"
        out.own(sft)
        if d.main and not cfg.resume:
            shutil.rmtree(sft, ignore_errors=True)
        if d.main and not (sft / "final" / "model.safetensors").is_file():
            warm_up(sft, steps=cfg.sft_steps, lr=cfg.sft_lr, correct_fraction=cfg.demo_correct_fraction,
                    n_train=cfg.synthetic_train, n_eval=cfg.synthetic_eval, seed=cfg.seed, device=cfg.device,
                    backend=cfg.backend, threads=cfg.threads, resume=bool(cfg.resume))
        d.barrier()
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(sft / "final" / "model.safetensors")))
    return model
