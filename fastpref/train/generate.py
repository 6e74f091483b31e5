"""Sampling completions: Hugging Face ``generate`` (KV cache, batched, left-padded prompts), and Nash-MD's
geometric mixture π_θ^(1−β)·π_ref^β sampled token by token through a logits processor.

Generation is the one place where logits exist: only the last position's [B, V] row per step, never
[tokens × vocab]. A completion is a list of token ids that ends with EOS when the model stopped by itself
(padding after EOS removed); one that hit ``max_new_tokens`` has no EOS.
"""
from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[Tensor, Tensor]:
    """Prompts → (input_ids [B, P], attention_mask [B, P]), padded on the left as ``generate`` needs."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):], mask[i, P - len(p):] = torch.tensor(p), 1
    return ids.to(device), mask.to(device)


class GeometricMixture:
    """Logits processor for ``generate``: next-token logits (1−β)·z_θ + β·z_ref, so that the softmax is
    ∝ π_θ^(1−β)·π_ref^β (Nash-MD; TRL's ``GeometricMixtureWrapper`` with ``mixture_coef`` β).

    ``scores`` [B, V] are the policy's raw logits (this processor must come first); the reference runs on the
    same tokens with its own KV cache. ``attention_mask`` [B, P]: the left-padded prompts' mask, rows already
    repeated for ``num_return_sequences``. Temperature / top-p are applied after the mixture."""

    def __init__(self, ref: nn.Module, beta: float, attention_mask: Tensor):
        self.ref, self.beta = ref, float(beta)
        self.mask = attention_mask
        self.cache = None
        self.seen = 0
        # transformers >= 5.x names the KV cache ``cache`` (``past_key_values`` before)
        self._cache_arg = "cache" if "cache" in inspect.signature(ref.forward).parameters else "past_key_values"

    @torch.no_grad()
    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        new = input_ids[:, self.seen:]
        if self.seen:
            self.mask = torch.cat([self.mask, self.mask.new_ones(new.shape)], dim=1)
        pos = (self.mask.cumsum(-1) - 1).clamp(min=0)[:, -new.shape[1]:]
        out = self.ref(input_ids=new, attention_mask=self.mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                       **{self._cache_arg: self.cache})
        self.cache, self.seen = out[self._cache_arg], input_ids.shape[1]
        return (1.0 - self.beta) * scores.float() + self.beta * out.logits[:, -1].float()


@torch.no_grad()
def generate(model: nn.Module, prompts: list[list[int]], *, n: int = 1, greedy: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 16, eos_id: int | None,
             pad_id: int, seed: int = 0, mixture: tuple[nn.Module, float] | None = None,
             output_scores: bool = False):
    """``n`` completions per prompt (prompt-major: prompt i's samples at [i·n, (i+1)·n)).

    Sampling with ``temperature`` / nucleus ``top_p`` (no top-k), or ``greedy``. ``mixture=(ref, β)`` samples
    from the geometric mixture of ``model`` and ``ref`` instead of ``model``. The sampler's random stream is
    ``seed`` alone (the global RNG is left untouched), so a batch is reproducible wherever it runs.
    ``output_scores``: also return the sampling distribution's logits of every step (a list of [B·n, V])."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    dev = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id, dev)
    procs = LogitsProcessorList()
    kw: dict = dict(do_sample=not greedy, temperature=1.0, top_p=1.0)
    if getattr(model.generation_config, "top_k", None):  # a model default such as top_k=50 would cut the tail
        kw["top_k"] = 0
    if mixture is not None:
        procs.append(GeometricMixture(mixture[0], mixture[1], mask.repeat_interleave(n, 0)))
    if not greedy:
        if temperature != 1.0:
            procs.append(TemperatureLogitsWarper(temperature))
        if top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p))
    was = model.training
    model.eval()
    devices = [dev] if dev.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 num_return_sequences=n, eos_token_id=eos_id, pad_token_id=pad_id, use_cache=True,
                                 logits_processor=procs, return_dict_in_generate=True,
                                 output_scores=output_scores, **kw)
    finally:
        model.train(was)
    completions = [trim(row, eos_id, pad_id) for row in out.sequences[:, ids.shape[1]:].tolist()]
    return (completions, list(out.scores)) if output_scores else completions


def trim(tokens: list[int], eos_id: int | None, pad_id: int) -> list[int]:
    """Cut a generated row after its first EOS (kept); without EOS, drop trailing padding."""
    if eos_id is not None and eos_id in tokens:
        return tokens[: tokens.index(eos_id) + 1]
    while tokens and tokens[-1] == pad_id and pad_id != eos_id:
        tokens = tokens[:-1]
    return tokens
