"""Judges: who decides which completion is better. One small interface, four kinds.

- ``verifier`` (default on the synthetic task): the task's exact checker; reward = digits right at their
  position / max(answer length, completion length), comparisons are hard (1, ½ on ties, 0).
- ``module:function``: a Python reward function ``f(prompts: list[str], completions: list[str]) -> list[float]``.
- ``pairwise:module:function``: a pairwise preference model ``f(prompts, completions_a, completions_b) ->
  list[float]`` returning P(a ≻ b) in [0, 1].
- a local folder: a sequence-classification reward model (e.g. from ``fastpref train --task reward``),
  reward = its first logit on prompt + completion.

Reward judges turn rewards into preferences with P(y ≻ y′) = σ((r − r′)/τ) (``judge_temperature`` τ; τ = 0
gives hard comparisons). Every judge answers :meth:`Judge.prefer` and :meth:`Judge.matrix`; reward judges also
:meth:`Judge.rewards` (others return None), and :meth:`Judge.skew` gives GPM-style skew-symmetric scores.
"""
from __future__ import annotations

import importlib
import math
import re
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .. import synthetic


class JudgeError(ValueError):
    """A judge that cannot be loaded or that answered something unusable (the message says what)."""


def _floats(values, n: int, what: str, lo: float = -math.inf, hi: float = math.inf) -> list[float]:
    try:
        out = [float(v) for v in (values.tolist() if isinstance(values, Tensor) else values)]
    except (TypeError, ValueError):
        raise JudgeError(f"{what} must return a list of {n} numbers, got {type(values).__name__}") from None
    if len(out) != n:
        raise JudgeError(f"{what} returned {len(out)} values for {n} completions")
    bad = [v for v in out if not (math.isfinite(v) and lo <= v <= hi)]
    if bad:
        raise JudgeError(f"{what} returned {bad[0]!r}; expected finite values in [{lo}, {hi}]")
    return out


class Judge:
    """The interface. ``prefer`` must be implemented; reward judges implement ``rewards`` instead."""

    name = "judge"
    temperature = 0.0

    def rewards(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float] | None:
        """Scalar rewards [n], or None for a judge that only compares."""
        return None

    def prefer(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[float]:
        """P(a_i ≻ b_i | prompt_i) [n]."""
        ra, rb = self.rewards(prompts, a), self.rewards(prompts, b)
        return [float(p) for p in preference(torch.tensor(ra, dtype=torch.float64),
                                             torch.tensor(rb, dtype=torch.float64), self.temperature)]

    def matrix(self, prompt: str, completions: Sequence[str]) -> Tensor:
        """P[i, j] = P(y_i ≻ y_j) [K, K] float64, ½ on the diagonal; from rewards when the judge has them,
        else from ``prefer`` on the pairs i < j with P[j, i] = 1 − P[i, j]."""
        K = len(completions)
        r = self.rewards([prompt] * K, completions)
        if r is not None:
            r = torch.tensor(r, dtype=torch.float64)
            return preference(r[:, None], r[None, :], self.temperature)
        P = torch.full((K, K), 0.5, dtype=torch.float64)
        ij = [(i, j) for i in range(K) for j in range(i + 1, K)]
        if ij:
            p = self.prefer([prompt] * len(ij), [completions[i] for i, _ in ij], [completions[j] for _, j in ij])
            for (i, j), v in zip(ij, p):
                P[i, j], P[j, i] = v, 1.0 - v
        return P

    def skew(self, prompt: str, completions: Sequence[str], clip: float = 10.0) -> Tensor:
        """Skew-symmetric scores s[i, j] = −s[j, i] [K, K] float64 (GPO/GPM), the logit of P(y_i ≻ y_j):
        (r_i − r_j)/τ for reward judges (r_i − r_j at τ = 0, where the hard preference has no finite logit),
        logit P(y_i ≻ y_j) clamped to ±``clip`` for pairwise judges."""
        r = self.rewards([prompt] * len(completions), completions)
        if r is not None:
            r = torch.tensor(r, dtype=torch.float64)
            return (r[:, None] - r[None, :]) / (self.temperature if self.temperature > 0 else 1.0)
        P = self.matrix(prompt, completions).clamp(1e-12, 1 - 1e-12)
        return (torch.log(P) - torch.log1p(-P)).clamp(-clip, clip)


def preference(ra: Tensor, rb: Tensor, temperature: float) -> Tensor:
    """P(a ≻ b) from rewards: σ((r_a − r_b)/τ), or the hard 1 / ½ / 0 when τ = 0."""
    d = ra - rb
    if temperature <= 0:
        return (d > 0).double() + 0.5 * (d == 0).double()
    return torch.sigmoid(d / temperature)


# --------------------------------------------------------------------------------------- the synthetic verifier
_PROMPT = re.compile(r"add (\d+) : ((?:\d )*\d)\s*$")


def synthetic_answer(prompt: str) -> list[str] | None:
    """The exact answer of a synthetic-task prompt ``add K : d1 ... dn`` (None for another prompt)."""
    m = _PROMPT.search(prompt.strip())
    return None if m is None else synthetic.answer(m.group(0)).split()


def synthetic_score(prompt: str, completion: str) -> tuple[float, bool]:
    """(digits right at their position / max(answer length, completion length), exact match)."""
    want = synthetic_answer(prompt)
    if want is None:
        raise JudgeError(f"the synthetic verifier cannot judge prompt {prompt[:60]!r} (expected 'add K : d1 ... dn')")
    got = completion.split()
    right = sum(a == b for a, b in zip(got, want))
    return right / max(len(want), len(got)), got == want


class Verifier(Judge):
    name = "verifier"

    def rewards(self, prompts, completions):
        return [synthetic_score(p, c)[0] for p, c in zip(prompts, completions)]


# --------------------------------------------------------------------------------------- user judges
def _import(path: str, what: str) -> Callable:
    mod, _, fn = path.partition(":")
    if not mod or not fn:
        raise JudgeError(f"--judge {what}: expected 'module:function', got {path!r}")
    try:
        obj = getattr(importlib.import_module(mod), fn)
    except ImportError as e:
        raise JudgeError(f"--judge {path!r}: cannot import module {mod!r} ({e})") from None
    except AttributeError:
        raise JudgeError(f"--judge {path!r}: module {mod!r} has no attribute {fn!r}") from None
    if not callable(obj):
        raise JudgeError(f"--judge {path!r}: {fn!r} is not callable")
    return obj


def guarded(fn: Callable, args: tuple, what: str, timeout: float | None) -> Any:
    """``fn(*args)`` (a user's judge function) under the one-line error rule: whatever it raises becomes a
    :class:`JudgeError` naming ``what``, and so does no answer within ``timeout`` seconds (None: no limit). The
    call runs in a daemon thread, so a judge that hangs cannot keep the process alive after the error."""
    box: dict[str, Any] = {}

    def call() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - reported as one line
            box["error"] = e

    worker = threading.Thread(target=call, name=f"judge {what}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise JudgeError(f"{what} gave no answer within {timeout:g} s (--judge-timeout)")
    if "error" in box:
        e = box["error"]
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise JudgeError(f"{what} raised {type(e).__name__}" + (f": {text}" if text else ""))
    return box["value"]


class RewardFunction(Judge):
    def __init__(self, fn: Callable, name: str, temperature: float, timeout: float | None = None):
        self.fn, self.name, self.temperature, self.timeout = fn, name, temperature, timeout

    def rewards(self, prompts, completions):
        what = f"reward function {self.name}"
        return _floats(guarded(self.fn, (list(prompts), list(completions)), what, self.timeout), len(completions),
                       what)


class PairwiseFunction(Judge):
    def __init__(self, fn: Callable, name: str, timeout: float | None = None):
        self.fn, self.name, self.timeout = fn, name, timeout

    def prefer(self, prompts, a, b):
        what = f"pairwise judge {self.name}"
        return _floats(guarded(self.fn, (list(prompts), list(a), list(b)), what, self.timeout), len(a), what,
                       0.0, 1.0)


class RewardModel(Judge):
    """A local ``AutoModelForSequenceClassification`` folder; reward = logit 0 of prompt + completion."""

    def __init__(self, folder: str, temperature: float, device, batch_size: int = 32):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            from ..model import hub_kernel_args

            self.model = AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True,
                                                                            **hub_kernel_args())
        except (OSError, ValueError) as e:
            raise JudgeError(f"--judge {folder}: not a sequence-classification reward model folder ({e})") from None
        self.model.to(device).eval()
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.model.config.pad_token_id = self.tok.pad_token_id
        self.name, self.temperature, self.device, self.bs = folder, temperature, device, batch_size

    @torch.no_grad()
    def rewards(self, prompts, completions):
        out: list[float] = []
        texts = [f"{p} {c}" for p, c in zip(prompts, completions)]
        for i in range(0, len(texts), self.bs):
            enc = self.tok(texts[i:i + self.bs], return_tensors="pt", padding=True).to(self.device)
            out += self.model(**enc).logits[:, 0].float().tolist()
        return _floats(out, len(texts), f"reward model {self.name}")


def make_judge(spec: str | None, *, synthetic: bool, temperature: float = 0.0, device="cpu",
               timeout: float | None = None) -> Judge:
    """The judge named by ``--judge`` (see the module docstring); ``None`` → the verifier on the synthetic task.
    ``timeout``: seconds a user's judge function may take for one call (:func:`guarded`)."""
    if spec in (None, "", "verifier"):
        if not synthetic and spec != "verifier":
            raise JudgeError("--judge is required with --prompts (the verifier only knows the synthetic task): "
                             "'module:function', 'pairwise:module:function' or a reward-model folder")
        return Verifier()
    if spec.startswith("pairwise:"):
        return PairwiseFunction(_import(spec[len("pairwise:"):], "pairwise:module:function"), spec, timeout)
    if Path(spec).is_dir():
        return RewardModel(spec, temperature, device)
    if ":" in spec and not spec.startswith((".", "/")):
        return RewardFunction(_import(spec, "module:function"), spec, temperature, timeout)
    raise JudgeError(f"--judge {spec!r}: expected 'verifier', 'module:function', 'pairwise:module:function' "
                     "or a local reward-model folder")
