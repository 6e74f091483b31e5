"""Greedy answers to prompts, scored by a task's verifier: what a user of the trained model sees.

A *verifier* is a function ``verifier(prompt, answer) -> {score name: value in [0, 1]}`` (e.g. the synthetic
task's :func:`fastpref.train.synthetic.verify`: exact match and per-digit accuracy). :func:`greedy_scores`
decodes every prompt greedily and averages the verifier's scores; :func:`greedy_answers` returns the answers.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from torch import nn

from .data import with_start
from .generate import generate

Verifier = Callable[[Any, str], dict]


def prompt_text(tokenizer, prompt: str | list) -> str:
    """The prompt as text: plain text as it is, chat messages rendered by the chat template with the generation
    prompt."""
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return prompt


def prompt_ids(tokenizer, prompt: str | list) -> list[int]:
    """Token ids of a prompt as training sees it: plain text with the tokenizer's special tokens (BOS), or chat
    messages rendered by the chat template (which brings its own special tokens); an empty prompt starts with
    the token that training starts it with (:func:`~fastpref.train.data.with_start`)."""
    ids = tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=not isinstance(prompt, list))["input_ids"]
    return with_start(tokenizer, ids)


def greedy_answers(model: nn.Module, tokenizer, prompts: Sequence[str | list], *, max_new_tokens: int = 32,
                   batch_size: int = 64) -> list[str]:
    """The model's greedy answer (decoded text, special tokens dropped) to each prompt, in order. Prompts are
    batched by token length, so no padding is involved (``generate``, cached); the model is put in eval mode
    and restored. The decoding is :func:`~fastpref.train.generate.generate` with ``greedy=True``, as everywhere
    in the trainer."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    answers: list[str] = [""] * len(prompts)
    for idx in by_length.values():
        for s in range(0, len(idx), batch_size):
            part = idx[s:s + batch_size]
            new = generate(model, [encoded[i] for i in part], greedy=True, max_new_tokens=max_new_tokens,
                           eos_id=eos, pad_id=pad)
            for i, ids in zip(part, new):
                answers[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
    return answers


def greedy_scores(model: nn.Module, tokenizer, prompts: Sequence[str | list], verifier: Verifier, *,
                  max_new_tokens: int = 32, batch_size: int = 64) -> dict[str, float]:
    """The verifier's scores of the greedy answers, averaged over the prompts: {score name: mean}."""
    if not prompts:
        return {}
    answers = greedy_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return mean_scores(prompts, answers, verifier)


def mean_scores(prompts: Sequence[str | list], answers: Sequence[str], verifier: Verifier) -> dict[str, float]:
    """The verifier's scores of ``answers[i]`` to ``prompts[i]``, averaged over the (non-empty) prompts:
    {score name: mean}."""
    totals: dict[str, float] = {}
    for p, a in zip(prompts, answers):
        for k, v in verifier(p, a).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    return {k: v / len(prompts) for k, v in totals.items()}
