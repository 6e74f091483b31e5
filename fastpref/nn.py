"""Modules that go from hidden states to a preference loss in one fused pass.

The policy's per-token statistics come from the fused primitive (or ``token_kl`` when a loss needs the
full-vocabulary KL); they are reduced per sequence and handed to the loss functions of
``fastpref.losses``: each loss receives exactly the quantities its signature names.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import Tensor

from . import losses as L
from ._rows import use_sync_free
from .kl import token_kl
from .stats import token_logprobs, token_stats

LAYOUTS = ("pairs", "list", "unpaired")


@dataclass
class LossOutput:
    """loss: scalar (mean over examples); losses: per example [B] (pairs/list) or [S] (unpaired);
    metrics: detached scalars with TRL's names where TRL logs the same quantity."""

    loss: Tensor
    losses: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


def loss_params(fn) -> set[str]:
    """The keyword inputs a loss function takes (its signature's parameter names)."""
    return set(inspect.signature(fn).parameters)


def unpack(values: Tensor, cu_seqlens: Tensor, fill: float | int = 0, *, static: bool = False) -> Tensor:
    """Packed [N] (sequences concatenated, boundaries ``cu_seqlens`` [S+1]) → padded [S, T_max] (differentiable).

    static (always under torch.compile): no host synchronisation and no check of ``cu_seqlens``; the width is N
    (the extra columns hold ``fill``), so shapes do not depend on the data.
    """
    cu = cu_seqlens.to(device=values.device, dtype=torch.int64)
    static = static or torch.compiler.is_compiling()
    if not static:
        if cu.dim() != 1 or cu.numel() < 2 or cu[0] != 0 or (cu[1:] < cu[:-1]).any() or cu[-1] > values.numel():
            raise ValueError(f"cu_seqlens must be a non-decreasing int tensor [S+1] from 0 to at most N="
                             f"{values.numel()}, got {cu.tolist()[:8]}")
        n, width = int(cu[-1]), int((cu[1:] - cu[:-1]).max())
    else:
        n = width = values.numel()
    S = cu.numel() - 1
    pos = torch.arange(n, device=values.device)
    seg = torch.searchsorted(cu[1:], pos, right=True)  # S for trailing positions past cu[-1]: a row dropped below
    out = torch.full((S + 1, width), fill, dtype=values.dtype, device=values.device)
    return out.index_put((seg, pos - cu[seg]), values.reshape(-1)[:n])[:S]


class PreferenceLoss(torch.nn.Module):
    """Preference loss(es) from the policy's last hidden states and lm_head, without [N, V] logits.

    loss: a registry name (``fastpref.losses.names()``) or {name: weight} for a weighted sum (TRL's
    ``loss_type`` list with ``loss_weights``). Hyper-parameters (beta, label_smoothing, ...) go to every
    loss whose signature takes them.
    layout: how sequences are arranged along the batch
      - "pairs":    2B sequences, the B chosen first, then the B rejected;
      - "list":     B·K sequences, prompt-major (K = ``num_responses`` per prompt);
      - "unpaired": S sequences with a ``desirable`` bool [S] passed to forward (KTO/BCO).
    use_weighting: WPO weights w(y_w)·w(y_l) from log Σp² (TRL's ``use_weighting``), pairs only.
    sync_free: a forward without host synchronisation (None: env FASTPREF_SYNC_FREE; always under
    torch.compile and CUDA-graph capture): ignored rows masked (see ``token_stats``), packed inputs padded to
    width N unchecked, and ``metrics`` as detached 0-d tensors (NaN for a metric without examples) instead of
    floats.
    """

    def __init__(self, loss: str | Mapping[str, float] = "sigmoid", *, layout: str = "pairs",
                 num_responses: int | None = None, temperature: float = 1.0, softcap: float | None = None,
                 ignore_index: int = -100, use_weighting: bool = False, backend: str = "auto",
                 sync_free: bool | None = None, **hparams):
        super().__init__()
        weights = {loss: 1.0} if isinstance(loss, str) else dict(loss)
        if not weights:
            raise ValueError("loss must name at least one loss")
        self.fns = {name: L.get(name) for name in weights}
        self.weights = weights
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if layout == "list" and (not isinstance(num_responses, int) or num_responses < 2):
            raise ValueError(f"layout='list' needs num_responses K >= 2, got {num_responses!r}")
        if use_weighting and layout != "pairs":
            raise ValueError("use_weighting (WPO) is defined for layout='pairs'")
        self.params = {name: loss_params(fn) for name, fn in self.fns.items()}
        self.accepted = set().union(*self.params.values())
        unknown = sorted(set(hparams) - self.accepted)
        if unknown:
            raise ValueError(f"hyper-parameter(s) {unknown} are not taken by loss(es) {sorted(self.fns)}")
        self.layout, self.K, self.hparams = layout, num_responses, hparams
        self.opts = dict(temperature=temperature, softcap=softcap, ignore_index=ignore_index, backend=backend,
                         sync_free=sync_free)
        self.use_weighting = use_weighting
        self.needs_kl = "chosen_token_kl" in self.accepted
        self.needs_tokens = any(p.endswith(("_token_logps", "_shared_logps")) for p in self.accepted)
        self.needs_ref = any(p.startswith("ref_") and p != "ref_sample_logps" for p in self.accepted)
        self.beta = float(hparams.get("beta", 0.1))

    # ---------------------------------------------------------------------------------------------
    def forward(self, hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None = None,
                cu_seqlens: Tensor | None = None, ref_logps: Tensor | None = None,
                ref_token_logps: Tensor | None = None, ref_hidden: Tensor | None = None,
                ref_weight: Tensor | None = None, ref_bias: Tensor | None = None,
                ref_softcap: float | None = None, desirable: Tensor | None = None, **loss_inputs) -> LossOutput:
        """hidden [S, T, D] with labels [S, T] (already shifted: labels[s, t] is predicted from hidden[s, t]),
        or packed hidden [N, D] / [1, N, D] with labels [N] / [1, N] and ``cu_seqlens`` [S+1].
        Reference: ``ref_logps`` [S] (per-sequence sums, e.g. precomputed once), ``ref_token_logps`` shaped
        like labels, or the reference model's ``ref_hidden`` / ``ref_weight`` (/ ``ref_bias``), needed for
        token-level KL losses. Extra inputs a loss takes (soft_labels, scores, rewards, kl, ...) pass as keywords.
        """
        ignore = self.opts["ignore_index"]
        sync_free = use_sync_free(self.opts["sync_free"], labels.device)
        if cu_seqlens is None and labels.dim() != 2:
            raise ValueError(f"labels must be [S, T] (or packed with cu_seqlens), got {tuple(labels.shape)}")
        tok, ref_tok, kl_tok, p2_tok = self._token_stats(hidden, weight, labels, bias, ref_token_logps,
                                                         ref_hidden, ref_weight, ref_bias, ref_softcap)
        if cu_seqlens is None:
            mask = labels != ignore
        else:  # packed: per-token results to padded [S, T_max]
            mask = unpack(labels.reshape(-1), cu_seqlens, fill=ignore, static=sync_free) != ignore
            tok, ref_tok, kl_tok, p2_tok = (None if x is None else unpack(x.reshape(-1), cu_seqlens, static=sync_free)
                                            for x in (tok, ref_tok, kl_tok, p2_tok))
        sums, counts = L.masked_sums(tok, mask)
        ref_sums = self._ref_sums(ref_logps, ref_tok, mask, sums.shape[0])
        ctx = self._context(sums, counts, ref_sums, tok, ref_tok, kl_tok, mask, desirable)
        per_example = self._apply(ctx, loss_inputs)
        if self.use_weighting:
            w = L.wpo_weights(tok, p2_tok, mask)
            B = w.shape[0] // 2
            per_example = per_example * (w[:B] * w[B:])
        return LossOutput(per_example.mean(), per_example, self._metrics(ctx, kl_tok, mask, sync_free))

    def _token_stats(self, hidden, weight, labels, bias, ref_token_logps, ref_hidden, ref_weight, ref_bias,
                     ref_softcap):
        have_model = ref_hidden is not None and ref_weight is not None
        kl_tok = p2_tok = None
        if self.needs_kl:
            if not have_model:
                raise ValueError(f"loss(es) {sorted(self.fns)} need the full-vocabulary token KL: pass ref_hidden "
                                 "and ref_weight (the reference model's last hidden states and lm_head)")
            out = token_kl(hidden, weight, ref_hidden, ref_weight, labels, bias=bias, ref_bias=ref_bias,
                           ref_softcap=ref_softcap, **self.opts)
            return out.logp, out.ref_logp, out.kl, None
        st = token_stats(hidden, weight, labels, bias=bias, log_sum_p2=self.use_weighting, **self.opts)
        tok, p2_tok = st.logp, st.log_sum_p2
        ref_tok = ref_token_logps
        if ref_tok is None and have_model:
            with torch.no_grad():
                ref_tok = token_logprobs(ref_hidden, ref_weight, labels, bias=ref_bias,
                                         **{**self.opts, "softcap": ref_softcap})
        if ref_tok is not None and ref_tok.shape != labels.shape:
            raise ValueError(f"ref_token_logps must be shaped like labels {tuple(labels.shape)}, "
                             f"got {tuple(ref_tok.shape)}")
        return tok, ref_tok, kl_tok, p2_tok

    def _ref_sums(self, ref_logps, ref_tok, mask, S):
        if ref_logps is not None:
            if ref_logps.shape != (S,):
                raise ValueError(f"ref_logps must be per-sequence sums [S]=[{S}], got {tuple(ref_logps.shape)}")
            return ref_logps.detach().float()
        if ref_tok is not None:
            return L.masked_sums(ref_tok.detach(), mask)[0]
        if self.needs_ref:
            raise ValueError(f"loss(es) {sorted(self.fns)} need reference log-probs: pass ref_logps, "
                             "ref_token_logps, or ref_hidden and ref_weight")
        return None

    def _context(self, sums, counts, ref_sums, tok, ref_tok, kl_tok, mask, desirable) -> dict:
        """Every quantity a loss may name, for this layout."""
        S = sums.shape[0]
        if self.layout == "unpaired":
            if desirable is None or desirable.shape != (S,):
                raise ValueError(f"layout='unpaired' needs desirable: bool [S]=[{S}]")
            return dict(logps=sums, ref_logps=ref_sums, lengths=counts, labels=desirable.bool())
        if self.layout == "list":
            if S % self.K:
                raise ValueError(f"layout='list' with K={self.K} needs a multiple of K sequences, got {S}")
            view = lambda x: None if x is None else x.reshape(S // self.K, self.K)  # noqa: E731
            return dict(logps=view(sums), ref_logps=view(ref_sums), lengths=view(counts))
        if S % 2:
            raise ValueError(f"layout='pairs' needs chosen then rejected sequences (an even count), got {S}")
        B = S // 2
        w, l = slice(0, B), slice(B, S)  # noqa: E741
        half = lambda x, s: None if x is None else x[s]  # noqa: E731
        ctx = dict(chosen_logps=sums[w], rejected_logps=sums[l], chosen_lengths=counts[w],
                   rejected_lengths=counts[l], ref_chosen_logps=half(ref_sums, w),
                   ref_rejected_logps=half(ref_sums, l), sft_target_logps=sums[w],
                   chosen_nll=(-sums[w].sum() / counts[w].sum().clamp(min=1)).expand(B))
        if self.needs_tokens:
            ctx.update(chosen_token_logps=tok[w], rejected_token_logps=tok[l], chosen_mask=mask[w],
                       rejected_mask=mask[l], ref_chosen_token_logps=half(ref_tok, w),
                       ref_rejected_token_logps=half(ref_tok, l), chosen_token_kl=half(kl_tok, w),
                       rejected_token_kl=half(kl_tok, l))
            shared = L.ld_dpo_shared_lengths(mask[w], mask[l]).repeat(2)
            for prefix, t in (("", tok), ("ref_", ref_tok)):
                if t is not None:
                    head, tail = L.ld_dpo_partial_sums(t, mask, shared)
                    ctx.update({f"{prefix}chosen_shared_logps": head[w], f"{prefix}chosen_tail_logps": tail[w],
                                f"{prefix}rejected_shared_logps": head[l], f"{prefix}rejected_tail_logps": tail[l]})
        return ctx

    def _apply(self, ctx: dict, loss_inputs: dict) -> Tensor:
        unknown = sorted(set(loss_inputs) - self.accepted)
        if unknown:
            raise ValueError(f"input(s) {unknown} are not taken by loss(es) {sorted(self.fns)}")
        terms = {}
        for name, fn in self.fns.items():
            params = self.params[name]
            kwargs = {k: v for k, v in ctx.items() if k in params and v is not None}
            kwargs.update({k: v for k, v in {**self.hparams, **loss_inputs}.items() if k in params})
            terms[name] = fn(**kwargs)
        return L.combine(terms, self.weights)

    @torch.no_grad()
    def _metrics(self, ctx: dict, kl_tok: Tensor | None, mask: Tensor, sync_free: bool) -> dict[str, float | Tensor]:
        """TRL-named metrics: floats (one host synchronisation), or 0-d tensors when ``sync_free``."""
        m: dict[str, Tensor] = {}
        if kl_tok is not None:
            m["kl/mean_token"] = (kl_tok * mask).sum() / mask.sum().clamp(min=1)
        if self.layout == "pairs":
            w, l = ctx["chosen_logps"], ctx["rejected_logps"]  # noqa: E741
            rw = w - ctx["ref_chosen_logps"] if ctx["ref_chosen_logps"] is not None else w
            rl = l - ctx["ref_rejected_logps"] if ctx["ref_rejected_logps"] is not None else l
            rw, rl = self.beta * rw, self.beta * rl
            m.update({"rewards/chosen": rw.mean(), "rewards/rejected": rl.mean(),
                      "rewards/accuracies": (rw > rl).float().mean(), "rewards/margins": (rw - rl).mean(),
                      "logps/chosen": w.mean(), "logps/rejected": l.mean(),
                      "logps/ranking_accuracy": (w > l).float().mean()})
        elif self.layout == "list":
            lp = ctx["logps"]
            r = lp - ctx["ref_logps"] if ctx["ref_logps"] is not None else lp
            m.update({"rewards/mean": self.beta * r.mean(), "logps/mean": lp.mean()})
        else:  # means over the desirable / undesirable examples: NaN as tensors, left out as floats, when none
            lab, r = ctx["labels"], ctx["logps"] - (ctx["ref_logps"] if ctx["ref_logps"] is not None else 0)
            for key, sel in (("rewards/chosen", lab), ("rewards/rejected", ~lab)):
                m[key] = self.beta * torch.where(sel, r, torch.zeros_like(r)).sum() / sel.sum()
                m[f"{key}/count"] = sel.sum()
        if sync_free:
            return {k: v.detach() for k, v in m.items() if not k.endswith("/count")}
        values = dict(zip(m, torch.stack([v.float() for v in m.values()]).tolist())) if m else {}
        return {k: v for k, v in values.items() if not k.endswith("/count") and values.get(f"{k}/count") != 0}
