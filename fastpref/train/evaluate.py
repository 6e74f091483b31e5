"""Greedy answers to prompts, scored by a task's verifier: what a user of the trained model sees.

A *verifier* is a function ``verifier(prompt, answer) -> {score name: value in [0, 1]}`` (e.g. the synthetic
task's :func:`fastpref.train.synthetic.verify`: exact match and per-digit accuracy). :func:`greedy_scores`
decodes every prompt greedily and averages the verifier's scores; :func:`greedy_answers` returns the answers.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

Verifier = Callable[[Any, str], dict]


def prompt_text(tokenizer, prompt: str | list) -> str:
    """The prompt as text: plain text as it is, chat messages rendered by the chat template with the generation
    prompt."""
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return prompt


def prompt_ids(tokenizer, prompt: str | list) -> list[int]:
    """Token ids of a prompt as training sees it: plain text with the tokenizer's special tokens (BOS), or chat
    messages rendered by the chat template (which brings its own special tokens)."""
    return tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=not isinstance(prompt, list))["input_ids"]


@torch.no_grad()
def _greedy(model: nn.Module, ids: torch.Tensor, max_new_tokens: int, eos_id: int | None,
            pad_id: int | None) -> list[list[int]]:
    """Greedy continuations of equal-length prompts ``ids`` [B, T] (int64); each is cut before its first EOS."""
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=eos_id,
                         pad_token_id=pad_id if pad_id is not None else eos_id)
    rows = out[:, ids.shape[1]:].tolist()
    return [r[: r.index(eos_id)] if eos_id in r else r for r in rows]


def greedy_answers(model: nn.Module, tokenizer, prompts: Sequence[str | list], *, max_new_tokens: int = 32,
                   batch_size: int = 64) -> list[str]:
    """The model's greedy answer (decoded text, special tokens dropped) to each prompt, in order. Prompts are
    batched by token length, so no padding is involved (``generate``, cached); the model is put in eval mode
    and restored."""
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    answers: list[str] = [""] * len(prompts)
    was = model.training
    model.eval()
    try:
        for idx in by_length.values():
            for s in range(0, len(idx), batch_size):
                part = idx[s:s + batch_size]
                ids = torch.tensor([encoded[i] for i in part], dtype=torch.long, device=device)
                for i, new in zip(part, _greedy(model, ids, max_new_tokens, eos, pad)):
                    answers[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
    finally:
        model.train(was)
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
