"""Completion log-probs and token KL through the fused primitive (last hidden states + lm_head, no logits)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ...kl import token_kl
from ...stats import token_logprobs
from .. import data as D
from ..model import final_softcap, head, hidden_states


def _batch(seqs: list[tuple[list[int], list[int]]], pad_id: int, device) -> D.Batch:
    return D.collate(seqs, packed=False, pad_id=pad_id).to(device)


def token_logps(model: nn.Module, seqs: list[tuple[list[int], list[int]]], *, pad_id: int,
                backend: str = "auto") -> tuple[Tensor, Tensor]:
    """(log π(y_t | x, y_<t) [S, T] float32, completion mask [S, T] bool) for (prompt, completion) pairs;
    differentiable when grad is enabled. Row s's completion tokens are the True entries of mask[s], in order."""
    b = _batch(seqs, pad_id, next(model.parameters()).device)
    h = hidden_states(model, b.input_ids, b.position_ids, b.attention_mask)
    w, bias = head(model)
    tok = token_logprobs(h, w, b.labels, bias=bias, softcap=final_softcap(model), backend=backend)
    return tok, b.labels != -100


@torch.no_grad()
def completion_logps(model: nn.Module, seqs: list[tuple[list[int], list[int]]], *, pad_id: int,
                     backend: str = "auto", batch_size: int = 64) -> list[list[float]]:
    """Per-token log-probs of each completion (a list of len(completion) floats per sequence), no grad:
    how the references π_ref and π_t are evaluated (in their own dtype; results in float32)."""
    was = model.training
    model.eval()
    out: list[list[float]] = []
    try:
        for i in range(0, len(seqs), batch_size):
            tok, mask = token_logps(model, seqs[i:i + batch_size], pad_id=pad_id, backend=backend)
            out += [t[m].tolist() for t, m in zip(tok, mask)]
    finally:
        model.train(was)
    return out


def scatter(values: list[list[float]], mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Per-completion token values back to [S, T] ``dtype`` at the True entries of ``mask`` (0 elsewhere)."""
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    out[mask] = torch.tensor([v for row in values for v in row], dtype=dtype, device=mask.device)
    return out


@torch.no_grad()
def mean_token_kl(policy: nn.Module, ref: nn.Module, seqs: list[tuple[list[int], list[int]]], *, pad_id: int,
                  backend: str = "auto", batch_size: int = 64) -> float:
    """KL(π_θ‖π_ref) over the full vocabulary, averaged over the completion tokens of ``seqs`` (fused KL)."""
    total, count = 0.0, 0
    was = policy.training
    policy.eval()
    try:
        for i in range(0, len(seqs), batch_size):
            chunk = seqs[i:i + batch_size]
            b = _batch(chunk, pad_id, next(policy.parameters()).device)
            h = hidden_states(policy, b.input_ids, b.position_ids, b.attention_mask)
            rh = hidden_states(ref, b.input_ids, b.position_ids, b.attention_mask)
            (w, bias), (rw, rb) = head(policy), head(ref)
            kl = token_kl(h, w, rh.to(h.dtype) if rh.dtype != h.dtype else rh, rw.to(w.dtype), b.labels,
                          bias=bias, ref_bias=rb, direction="reverse", softcap=final_softcap(policy),
                          ref_softcap=final_softcap(ref), backend=backend).kl
            m = b.labels != -100
            total += float(kl[m].double().sum())
            count += int(m.sum())
    finally:
        policy.train(was)
    return total / max(count, 1)
