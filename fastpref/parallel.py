"""Vocabulary-parallel heads: each rank holds a slice [start, stop) of the vocabulary.

Every rank runs the ordinary backend on its slice; partial log-sum-exps, entropies, log Σp², KLs and
label log-probs are combined with all-reduces. Hidden states, labels and upstream gradients must be
the same on every rank (as in Megatron-style tensor parallelism); the hidden-state gradient is
all-reduced, the weight/bias gradients stay local to each slice.

Combination rules, with w_r = exp(lse_r − lse) the probability mass of slice r:
lse = log Σ_r exp(lse_r);  H = Σ_r w_r·H_r − Σ_r w_r·log w_r;  Σp² = Σ_r w_r²·Σp²_r;
KL(q‖p) = Σ_r w^q_r·(KL_r + log w^q_r − log w^p_r).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from . import backends
from ._checks import check_head, check_labels
from ._rows import Rows
from .backends.torch_backend import weighted
from .kl import DIRECTIONS, TokenKL
from .options import LogitOptions
from .stats import TokenStats


def _all_reduce(x: Tensor, group, op=dist.ReduceOp.SUM) -> Tensor:
    dist.all_reduce(x, op=op, group=group)
    return x


def _global_lse(lse_parts: Tensor, group) -> Tensor:
    """log Σ_ranks exp(lse_r), per column of lse_parts [k, M]."""
    m = _all_reduce(lse_parts.clone(), group, dist.ReduceOp.MAX)
    s = _all_reduce(torch.exp(lse_parts - m), group)
    return m + torch.log(s)


def _local_labels(labels: Tensor, start: int, stop: int) -> tuple[Tensor, Tensor]:
    local = labels - start
    owned = (local >= 0) & (local < stop - start)
    return torch.where(owned, local, torch.zeros_like(local)), owned


def _check_owned(owned: Tensor, group) -> None:
    count = _all_reduce(owned.to(torch.int32), group)
    if (count != 1).any():
        raise ValueError("labels must lie in exactly one rank's vocabulary slice [start, stop); "
                         f"{int((count != 1).sum())} label(s) do not")


class _VocabParallelStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, start, stop, group, backend, opts, want_entropy, want_p2):
        lab, owned = _local_labels(labels, start, stop)
        _check_owned(owned, group)
        if hidden.shape[0] == 0:  # every rank agrees (same labels): nothing to compute or combine
            empty = hidden.new_zeros(0, dtype=torch.float32)
            logp_r = lse_r = empty
            ent_r = empty if want_entropy else None
            p2_r = empty if want_p2 else None
        else:
            logp_r, lse_r, ent_r, p2_r = backend.stats_forward(hidden, weight, bias, lab, opts, want_entropy,
                                                               want_p2)
        lse = _global_lse(lse_r[None], group)[0]
        log_w = lse_r - lse
        w = torch.exp(log_w)
        parts = [torch.where(owned, logp_r + log_w, torch.zeros_like(lse))]
        # weighted: 0 for a slice without mass (every token banned by a −inf bias), whose own entropy, log Σp²
        # and KL are NaN there and would poison the all-reduced sum
        if want_entropy:
            parts.append(weighted(w, ent_r - log_w))
        if want_p2:
            parts.append(weighted(w, torch.exp(log_w + p2_r)))  # w²·Σp²_r
        summed = _all_reduce(torch.stack(parts), group)
        logp = summed[0]
        ent = summed[1] if want_entropy else None
        p2 = torch.log(summed[-1]) if want_p2 else None
        ctx.save_for_backward(hidden, weight, bias, lab, owned, lse, ent)
        ctx.cfg = (group, backend, opts)
        if p2 is not None:
            ctx.mark_non_differentiable(p2)
        return logp, lse, ent, p2

    @staticmethod
    def backward(ctx, g_logp, g_lse, g_ent, _g_p2):
        hidden, weight, bias, lab, owned, lse, ent = ctx.saved_tensors
        group, backend, opts = ctx.cfg
        if hidden.shape[0] == 0:
            return (torch.zeros_like(hidden), torch.zeros_like(weight), None if bias is None else torch.zeros_like(bias),
                    *(None,) * 8)
        zero = torch.zeros_like(lse)
        g_logp = zero if g_logp is None else g_logp.float()
        g_lse = zero if g_lse is None else g_lse.float()
        g_owned = torch.where(owned, g_logp, zero)
        # backend: dz = g_owned·[v = y] + p·(g_lse − g_logp − g_ent·(log p + H)), p from the global lse
        needs = tuple(ctx.needs_input_grad[:3])
        dh, dw, db = backends.stats_backward(backend, hidden, weight, bias, lab, lse, ent, g_owned,
                                             g_lse - g_logp + g_owned, g_ent, opts, needs)
        if dh is not None:
            dh = _all_reduce(dh.float().contiguous(), group).to(hidden.dtype)
        return (dh, None if dw is None else dw.to(weight.dtype), None if db is None else db.to(bias.dtype),
                None, None, None, None, None, None, None, None)


class _VocabParallelKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, start, stop, group, backend,
                opts, ref_opts, direction):
        if labels is not None:
            lab, owned = _local_labels(labels, start, stop)
            _check_owned(owned, group)
        else:
            lab = owned = None
        kl_r, lse_r, rlse_r, logp_r, rlogp_r = backend.kl_forward(hidden, weight, bias, ref_hidden, ref_weight,
                                                                  ref_bias, lab, opts, ref_opts, direction)
        lse, ref_lse = _global_lse(torch.stack([lse_r, rlse_r]), group)
        log_wp, log_wq = lse_r - lse, rlse_r - ref_lse
        if direction == "forward":
            parts = [weighted(torch.exp(log_wq), kl_r + log_wq - log_wp)]
        else:
            parts = [weighted(torch.exp(log_wp), kl_r + log_wp - log_wq)]
        if lab is not None:
            zero = torch.zeros_like(lse)
            parts += [torch.where(owned, logp_r + log_wp, zero), torch.where(owned, rlogp_r + log_wq, zero)]
        summed = _all_reduce(torch.stack(parts), group)
        kl = summed[0]
        logp, ref_logp = (summed[1], summed[2]) if lab is not None else (None, None)
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, lab, owned, lse, ref_lse, kl)
        ctx.cfg = (group, backend, opts, ref_opts, direction)
        if ref_logp is not None:
            ctx.mark_non_differentiable(ref_logp)
        return kl, logp, ref_logp

    @staticmethod
    def backward(ctx, g_kl, g_logp, _g_ref_logp):
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, lab, owned, lse, ref_lse, kl = ctx.saved_tensors
        group, backend, opts, ref_opts, direction = ctx.cfg
        needs = tuple(ctx.needs_input_grad[:3])
        total = [None, None, None]

        def add(grads):
            for i, g in enumerate(grads):
                if g is not None:
                    total[i] = g.float() if total[i] is None else total[i] + g.float()

        if g_kl is not None:
            add(backends.kl_backward(backend, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, None, lse,
                                     ref_lse, kl, g_kl, None, opts, ref_opts, direction, needs))
        if g_logp is not None and lab is not None:  # a second pass: the label term, with the global softmax
            g = g_logp.float()
            g_owned = torch.where(owned, g, torch.zeros_like(g))
            add(backends.stats_backward(backend, hidden, weight, bias, lab, lse, None, g_owned, g_owned - g, None, opts,
                                        needs))
        dh, dw, db = total
        if dh is not None:
            dh = _all_reduce(dh.contiguous(), group).to(hidden.dtype)
        return (dh, None if dw is None else dw.to(weight.dtype), None if db is None else db.to(bias.dtype),
                *(None,) * 11)


def _slice(vocab_range, weight: Tensor) -> tuple[int, int]:
    start, stop = (int(v) for v in vocab_range)
    if stop - start != weight.shape[0] or start < 0:
        raise ValueError(f"vocab_range {vocab_range} must be [start, stop) with stop − start = this rank's "
                         f"weight rows ({weight.shape[0]})")
    return start, stop


def vocab_parallel_token_stats(
    hidden: Tensor, weight: Tensor, labels: Tensor, *, vocab_range: tuple[int, int], group=None,
    bias: Tensor | None = None, temperature: float = 1.0, softcap: float | None = None, ignore_index: int = -100,
    entropy: bool = False, log_sum_p2: bool = False, backend: str = "auto",
) -> TokenStats:
    """``token_stats`` over a vocabulary split across the ranks of ``group``.

    weight [V_r, D] (and bias [V_r]) hold rows [start, stop) = ``vocab_range`` of the full head; labels are
    global vocabulary ids. Returns the same values as ``token_stats`` on the full head, on every rank.
    """
    opts = LogitOptions(temperature, softcap)
    h, w, b = check_head("", hidden, weight, bias)
    lab = check_labels(labels, h, ignore_index)
    start, stop = _slice(vocab_range, w)
    impl = backends.resolve(backend, h.device, h.dtype)
    rows = Rows.for_labels(lab, tuple(lab.shape), None, ignore_index)  # global V: checked across ranks
    outs = _VocabParallelStats.apply(rows.take(h), w.contiguous(), None if b is None else b.contiguous(),
                                     rows.take_labels(lab), start, stop, group, impl, opts, entropy, log_sum_p2)
    return TokenStats(*(None if o is None else rows.put(o) for o in outs))


def vocab_parallel_token_kl(
    hidden: Tensor, weight: Tensor, ref_hidden: Tensor, ref_weight: Tensor, labels: Tensor | None = None, *,
    vocab_range: tuple[int, int], group=None, bias: Tensor | None = None, ref_bias: Tensor | None = None,
    direction: str = "forward", temperature: float = 1.0, softcap: float | None = None,
    ref_softcap: float | None = None, ignore_index: int = -100, backend: str = "auto",
) -> TokenKL:
    """``token_kl`` with both heads split the same way over the ranks of ``group`` (see the module doc)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    opts, ref_opts = LogitOptions(temperature, softcap), LogitOptions(temperature, ref_softcap)
    h, w, b = check_head("", hidden, weight, bias)
    rh, rw, rb = check_head("ref_", ref_hidden, ref_weight, ref_bias)
    if rw.shape[0] != w.shape[0]:
        raise ValueError(f"ref_weight has {rw.shape[0]} rows but weight has {w.shape[0]}; the slices must match")
    start, stop = _slice(vocab_range, w)
    impl = backends.resolve(backend, h.device, h.dtype)
    if labels is None:
        lab, rows = None, Rows(tuple(h.shape[:-1]))
    else:
        lab = check_labels(labels, h, ignore_index)
        rows = Rows.for_labels(lab, tuple(lab.shape), None, ignore_index)
    rdet = [None if x is None else x.detach() for x in (rh, rw, rb)]
    outs = _VocabParallelKL.apply(
        rows.take(h), w.contiguous(), None if b is None else b.contiguous(), rows.take(rdet[0]),
        rdet[1].contiguous(), None if rdet[2] is None else rdet[2].contiguous(),
        None if lab is None else rows.take_labels(lab), start, stop, group, impl, opts, ref_opts, direction)
    return TokenKL(*(None if o is None else rows.put(o) for o in outs))
