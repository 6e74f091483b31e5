"""Modules that go from hidden states to a preference loss in one fused pass.

The policy's per-token statistics come from the fused primitive (or ``token_kl`` when a loss needs the
full-vocabulary KL); they are reduced per sequence and handed to the loss functions of
``fastpref.losses``: each loss receives exactly the quantities its signature names.
"""
from __future__ import annotations

import inspect
import warnings
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


def check_hparams(hparams: Mapping, accepted: set[str], losses: list[str]) -> None:
    """ValueError naming the hyper-parameters that none of ``losses`` takes."""
    unknown = sorted(set(hparams) - accepted)
    if unknown:
        raise ValueError(f"hyper-parameter(s) {unknown} are not taken by loss(es) {losses}")


@torch.no_grad()
def reference_logprobs(ref_hidden: Tensor, ref_weight: Tensor, labels: Tensor, ref_bias: Tensor | None,
                       ref_softcap: float | None, opts: Mapping) -> Tensor:
    """The reference model's per-token log-probs of ``labels`` (float32, shaped like labels, no gradient): the
    policy's options ``opts`` (temperature, ignore_index, backend, ...) with the reference's own softcap."""
    return token_logprobs(ref_hidden, ref_weight, labels, bias=ref_bias, **{**opts, "softcap": ref_softcap})


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
      - "unpaired": S sequences, one per example, with a ``desirable`` bool [S] passed to forward (KTO/BCO);
        token-level losses of one sequence (Nash-MD) get ``token_logps`` / ``ref_token_logps`` / ``mask``.
    use_weighting: WPO weights w(y_w)·w(y_l) from log Σp² (TRL's ``use_weighting``), pairs only.
    delta="running" (BCO, ``bco`` / ``bco_pair``): δ is the running mean of the implicit rewards
    β·(ℓ_θ - ℓ_ref) of every example seen in training so far (all processes), updated with the current batch
    before use (Jung+24; TRL's ``BCOTrainer``, whose ``RunningMoments`` counts each reward). Kept in the buffers
    ``delta_mean`` / ``delta_count`` (the trainer saves them with its checkpoints).
    nll_tokens: the token set of the ``chosen_nll`` term (ORPO, CPO, RPO, ASFT, R-ORPO), as TRL defines it by
    default: "sequence" (prompt + completion) for ``orpo`` (TRL's ORPOTrainer; forward then needs
    ``nll_labels``), "completion" for the others (TRL's CPOTrainer, DPO ``rpo_alpha``). Either can be forced.
    sync_free: a forward without host synchronisation (None: env FASTPREF_SYNC_FREE; always under
    torch.compile and CUDA-graph capture): ignored rows masked (see ``token_stats``), packed inputs padded to
    width N unchecked, and ``metrics`` as detached 0-d tensors (NaN for a metric without examples) instead of
    floats.
    Names and values are checked as ``fastpref train`` checks them (``fastpref.losses.registry``): the papers'
    names map to the registry's (``"dpo"`` is ``sigmoid``), an unknown name is a ValueError with the closest
    known ones, weights must be finite and > 0, hyper-parameters finite in float32 and in range (beta > 0, ...).
    A batch without a labelled token (no sequences, or every label ``ignore_index``) gives ``loss`` = a float32
    zero that keeps the graph (zero gradients for ``hidden`` and ``weight``), zero ``losses`` and no metrics,
    with a one-time warning (not detected with ``sync_free``).
    """

    RUNNING_DELTA_LOSSES = ("bco", "bco_pair")
    NLL_TOKENS = {"orpo": "sequence"}  # the rest: "completion"

    def __init__(self, loss: str | Mapping[str, float] = "sigmoid", *, layout: str = "pairs",
                 num_responses: int | None = None, temperature: float = 1.0, softcap: float | None = None,
                 ignore_index: int = -100, use_weighting: bool = False, backend: str = "auto",
                 nll_tokens: str | None = None, sync_free: bool | None = None, **hparams):
        super().__init__()
        given = {loss: 1.0} if isinstance(loss, str) else dict(loss)
        if not given:
            raise ValueError("loss must name at least one loss")
        L.check_weights(given)
        weights: dict[str, float] = {}
        for name, w in given.items():  # the papers' names too (dpo -> sigmoid)
            key = L.resolve(name)
            weights[key] = weights.get(key, 0.0) + w
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
        check_hparams(hparams, self.accepted, sorted(self.fns))
        L.check_values(self.fns, hparams)
        self.running_delta = hparams.get("delta") == "running"
        if self.running_delta:
            if not set(self.fns) & set(self.RUNNING_DELTA_LOSSES):
                raise ValueError(f"delta='running' is BCO's running reward mean: use it with "
                                 f"{' or '.join(self.RUNNING_DELTA_LOSSES)}")
            hparams = {k: v for k, v in hparams.items() if k != "delta"}
        self.register_buffer("delta_mean", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("delta_count", torch.zeros((), dtype=torch.float64), persistent=False)
        self.layout, self.K, self.hparams = layout, num_responses, hparams
        self.opts = dict(temperature=temperature, softcap=softcap, ignore_index=ignore_index, backend=backend,
                         sync_free=sync_free)
        self.use_weighting = use_weighting
        self.needs_kl = "chosen_token_kl" in self.accepted
        self.needs_tokens = any(p.endswith(("token_logps", "_shared_logps")) for p in self.accepted)
        self.needs_ref = any(p.startswith("ref_") and p != "ref_sample_logps" for p in self.accepted)
        self.beta = float(hparams.get("beta", 0.1))
        if nll_tokens not in (None, "sequence", "completion"):
            raise ValueError(f"nll_tokens must be 'sequence' or 'completion', got {nll_tokens!r}")
        default = "sequence" if any(self.NLL_TOKENS.get(n) == "sequence" for n in self.fns) else "completion"
        self.nll_tokens = (nll_tokens or default) if "chosen_nll" in self.accepted else None

    # ---------------------------------------------------------------------------------------------
    def forward(self, hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None = None,
                cu_seqlens: Tensor | None = None, ref_logps: Tensor | None = None,
                ref_token_logps: Tensor | None = None, ref_hidden: Tensor | None = None,
                ref_weight: Tensor | None = None, ref_bias: Tensor | None = None,
                ref_softcap: float | None = None, desirable: Tensor | None = None,
                nll_labels: Tensor | None = None, rm_token_logps: Tensor | None = None,
                **loss_inputs) -> LossOutput:
        """hidden [S, T, D] with labels [S, T] (already shifted: labels[s, t] is predicted from hidden[s, t]),
        or packed hidden [N, D] / [1, N, D] with labels [N] / [1, N] and ``cu_seqlens`` [S+1].
        Reference: ``ref_logps`` [S] (per-sequence sums, e.g. precomputed once), ``ref_token_logps`` shaped
        like labels, or the reference model's ``ref_hidden`` / ``ref_weight`` (/ ``ref_bias``), needed for
        token-level KL losses. Extra inputs a loss takes (soft_labels, scores, rewards, kl, ...) pass as keywords.
        ``nll_labels`` (shaped like labels, the prompt tokens labelled too): the token set of ``chosen_nll`` when
        ``nll_tokens="sequence"``; the fused pass then scores these labels (still one pass).
        ``rm_token_logps`` (shaped like labels): a third model's token log-probs (TGDPO's token-reward model).
        """
        ignore = self.opts["ignore_index"]
        sync_free = use_sync_free(self.opts["sync_free"], labels.device)
        if cu_seqlens is None and labels.dim() != 2:
            raise ValueError(f"labels must be [S, T] (or packed with cu_seqlens), got {tuple(labels.shape)}")
        stat_labels = labels
        if self.nll_tokens == "sequence":
            if nll_labels is None or nll_labels.shape != labels.shape:
                raise ValueError(f"nll_tokens='sequence' (the default of {sorted(self.fns)}) needs nll_labels shaped "
                                 f"like labels {tuple(labels.shape)} with the prompt tokens labelled too, or "
                                 "nll_tokens='completion'")
            stat_labels = torch.where(labels != ignore, labels, nll_labels)
        tok, ref_tok, kl_tok, p2_tok = self._token_stats(hidden, weight, stat_labels, labels, bias,
                                                         ref_token_logps, ref_hidden, ref_weight, ref_bias,
                                                         ref_softcap)
        to_padded = (lambda x: x) if cu_seqlens is None else \
            (lambda x: unpack(x.reshape(-1), cu_seqlens, fill=ignore, static=sync_free))  # noqa: E731
        mask = to_padded(labels) != ignore
        if rm_token_logps is not None and rm_token_logps.shape != labels.shape:
            raise ValueError(f"rm_token_logps must be shaped like labels {tuple(labels.shape)}, "
                             f"got {tuple(rm_token_logps.shape)}")
        rm_tok = None if rm_token_logps is None else rm_token_logps.detach()
        if cu_seqlens is not None:  # packed: per-token results to padded [S, T_max]
            tok, ref_tok, kl_tok, p2_tok, rm_tok = (None if x is None else
                                                    unpack(x.reshape(-1), cu_seqlens, static=sync_free)
                                                    for x in (tok, ref_tok, kl_tok, p2_tok, rm_tok))
        nll = None
        if stat_labels is not labels:  # sequence NLL sums, then the prompt tokens out of everything else
            nll = L.masked_sums(tok, to_padded(stat_labels) != ignore)
            tok, kl_tok, p2_tok = (None if x is None else x.masked_fill(~mask, 0.0) for x in (tok, kl_tok, p2_tok))
        sums, counts = L.masked_sums(tok, mask)
        ref_sums = self._ref_sums(ref_logps, ref_tok, mask, sums.shape[0])
        ctx = self._context(sums, counts, ref_sums, tok, ref_tok, kl_tok, mask, desirable, nll)
        if rm_tok is not None and self.layout == "pairs":
            B = rm_tok.shape[0] // 2
            ctx.update(rm_chosen_token_logps=rm_tok[:B], rm_rejected_token_logps=rm_tok[B:])
        if not sync_free:  # probabilities (soft labels, win-rates) in [0, 1], as the trainer checks its data
            L.check_values(self.fns, {k: v for k, v in loss_inputs.items() if k in L.registry.RANGES})
        per_example, terms = self._apply(ctx, loss_inputs)
        if self.use_weighting:
            w = L.wpo_weights(tok, p2_tok, mask)
            B = w.shape[0] // 2
            per_example = per_example * (w[:B] * w[B:])
        metrics, tokens = self._metrics(ctx, kl_tok, mask, sync_free, terms)
        if tokens == 0:  # an empty or all-ignored batch: a zero loss that keeps the graph
            _warn_once("PreferenceLoss: a batch without a labelled token (empty, or every label ignore_index) "
                       "gives a zero loss")
            return LossOutput(zero_loss(hidden, weight), per_example.detach() * 0.0, metrics)
        return LossOutput(per_example.mean(), per_example, metrics)

    def _token_stats(self, hidden, weight, stat_labels, labels, bias, ref_token_logps, ref_hidden, ref_weight,
                     ref_bias, ref_softcap):
        """Policy statistics on ``stat_labels`` (labels, or labels plus the prompt for a sequence NLL);
        reference statistics on ``labels``."""
        have_model = ref_hidden is not None and ref_weight is not None
        kl_tok = p2_tok = None
        if self.needs_kl:
            if not have_model:
                raise ValueError(f"loss(es) {sorted(self.fns)} need the full-vocabulary token KL: pass ref_hidden "
                                 "and ref_weight (the reference model's last hidden states and lm_head)")
            out = token_kl(hidden, weight, ref_hidden, ref_weight, stat_labels, bias=bias, ref_bias=ref_bias,
                           ref_softcap=ref_softcap, **self.opts)
            return out.logp, out.ref_logp, out.kl, None
        st = token_stats(hidden, weight, stat_labels, bias=bias, log_sum_p2=self.use_weighting, **self.opts)
        tok, p2_tok = st.logp, st.log_sum_p2
        ref_tok = ref_token_logps
        if ref_tok is None and have_model:
            ref_tok = reference_logprobs(ref_hidden, ref_weight, labels, ref_bias, ref_softcap, self.opts)
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

    def _context(self, sums, counts, ref_sums, tok, ref_tok, kl_tok, mask, desirable, nll=None) -> dict:
        """Every quantity a loss may name, for this layout."""
        S = sums.shape[0]
        if self.layout == "unpaired":
            if desirable is None and "desirable" not in self.accepted:  # e.g. Nash-MD samples with `probability`
                desirable = torch.ones(S, dtype=torch.bool, device=sums.device)
            if desirable is None or desirable.shape != (S,):
                raise ValueError(f"layout='unpaired' needs desirable: bool [S]=[{S}]")
            ctx = dict(logps=sums, ref_logps=ref_sums, lengths=counts, desirable=desirable.bool())
            return ctx if not self.needs_tokens else dict(ctx, token_logps=tok, ref_token_logps=ref_tok, mask=mask)
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
                   # (y, y') losses (online IPO / EGPO) and per-sequence terms (k1-k3, VPO) see the pair as
                   # y = chosen, y' = rejected
                   logps=sums[w], other_logps=sums[l], ref_logps=half(ref_sums, w),
                   ref_other_logps=half(ref_sums, l))
        if self.nll_tokens is not None:  # TRL's batch token mean over the chosen sequences' NLL token set
            nll_sums, nll_counts = (sums[w], counts[w]) if nll is None else (nll[0][w], nll[1][w])
            ctx["chosen_nll"] = (-nll_sums.sum() / nll_counts.sum().clamp(min=1)).expand(B)
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

    def _apply(self, ctx: dict, loss_inputs: dict) -> tuple[Tensor, dict[str, Tensor]]:
        """(the weighted sum of the losses' per-example values [B], each loss's own values {name: [B]})."""
        unknown = sorted(set(loss_inputs) - self.accepted)
        if unknown:
            raise ValueError(f"input(s) {unknown} are not taken by loss(es) {sorted(self.fns)}")
        delta = self._running_delta(ctx) if self.running_delta else None
        terms = {}
        for name, fn in self.fns.items():
            params = self.params[name]
            kwargs = {k: v for k, v in ctx.items() if k in params and v is not None}
            kwargs.update({k: v for k, v in {**self.hparams, **loss_inputs}.items() if k in params})
            if delta is not None and name in self.RUNNING_DELTA_LOSSES:
                kwargs["delta"] = delta
            terms[name] = fn(**kwargs)
        return L.combine(terms, self.weights), terms

    @torch.no_grad()
    def _running_delta(self, ctx: dict) -> Tensor:
        """BCO's δ: fold this batch's rewards (all processes) into the running mean of every reward seen in
        training so far, each example counted once (TRL's ``RunningMoments``), and return it."""
        if self.layout == "pairs":
            pol, ref = torch.cat([ctx["chosen_logps"], ctx["rejected_logps"]]), ctx["ref_chosen_logps"]
            ref = None if ref is None else torch.cat([ref, ctx["ref_rejected_logps"]])
        else:
            pol, ref = ctx["logps"].reshape(-1), ctx["ref_logps"]
        if ref is None:
            raise ValueError("delta='running' needs reference log-probs")
        if self.training:
            rewards = self.beta * (pol.double() - ref.reshape(-1).double())
            total = torch.stack([rewards.sum(), rewards.new_tensor(float(rewards.numel()))])  # [sum, count]
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(total)
            self.delta_count += total[1]
            self.delta_mean += (total[0] - total[1] * self.delta_mean) / self.delta_count.clamp(min=1)
        return self.delta_mean.float()

    @torch.no_grad()
    def _metrics(self, ctx: dict, kl_tok: Tensor | None, mask: Tensor, sync_free: bool,
                 terms: dict[str, Tensor]) -> tuple[dict[str, float | Tensor], int | None]:
        """(TRL-named metrics, labelled tokens): floats and the count (one host synchronisation), or 0-d tensors
        and None when ``sync_free``. No metrics for a batch without a labelled token. With several losses, each
        one's mean is ``loss/<name>`` (unweighted)."""
        m: dict[str, Tensor] = {}
        if len(terms) > 1:
            m.update({f"loss/{name}": t.detach().float().mean() for name, t in terms.items()})
        if kl_tok is not None:
            m["kl/mean_token"] = (kl_tok * mask).sum() / mask.sum().clamp(min=1)
        if self.running_delta:
            m["delta"] = self.delta_mean
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
            lab, r = ctx["desirable"], ctx["logps"] - (ctx["ref_logps"] if ctx["ref_logps"] is not None else 0)
            for key, sel in (("rewards/chosen", lab), ("rewards/rejected", ~lab)):
                m[key] = self.beta * torch.where(sel, r, torch.zeros_like(r)).sum() / sel.sum()
                m[f"{key}/count"] = sel.sum()
        if sync_free:
            return {k: v.detach() for k, v in m.items() if not k.endswith("/count")}, None
        m["tokens/count"] = mask.sum()
        values = dict(zip(m, torch.stack([v.double() for v in m.values()]).tolist()))
        metrics = {k: v for k, v in values.items() if not k.endswith("/count") and values.get(f"{k}/count") != 0}
        if not values["tokens/count"]:
            metrics = {}
        return metrics, int(values["tokens/count"])


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """``warnings.warn(message)`` the first time this process sees it."""
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=2)


def zero_loss(hidden: Tensor, weight: Tensor) -> Tensor:
    """A float32 zero that depends on ``hidden`` and ``weight`` (their gradients are zeros, not None), so that a
    backward pass and gradient synchronisation run as for any batch."""
    return hidden.float().sum() * 0.0 + weight.float().sum() * 0.0 + 0.0  # + 0.0: never -0.0


KL_MODES = ("k1", "k2", "k3", "exact")


class PolicyLoss(torch.nn.Module):
    """On-policy RL loss (``grpo`` / ``ppo_clip``, ``gspo``, ``cispo``: ``fastpref.losses.rl``) from the policy's
    last hidden states and lm_head, without [N, V] logits.

    Per-token log-probs and (when ``entropy_coef`` is set, or for the ``entropy`` metric with ``entropy=True``)
    entropies of the sampled tokens come from the fused primitive, with gradients.
    kl (used when ``beta`` != 0): "k3" (TRL, GRPO), "k1" or "k2" estimate KL(π_θ‖π_ref) on the sampled tokens
    from ``ref_token_logps`` or the reference's hidden states; "exact" takes the full-vocabulary
    KL(π_θ‖π_ref) per position from ``fastpref.token_kl`` (needs ``ref_hidden`` / ``ref_weight``).
    importance_sampling_mode / _clip_min / _clip_max: how ``sampler_token_logps`` (log-probs from another
    inference engine) become the importance weight π_old/π_sampler (``fastpref.losses.sampler_importance_ratio``;
    TRL's ``vllm_importance_sampling_*``). Hyper-parameters (epsilon, epsilon_high, delta, beta, loss_type,
    entropy_coef, ...) go to the loss, checked as :class:`PreferenceLoss` checks its own. A batch without a
    labelled token (no sequences, or every label ``ignore_index``) gives ``loss`` = a float32 zero that keeps the
    graph, zero ``losses`` and no metrics, with a one-time warning.
    """

    def __init__(self, loss: str = "grpo", *, kl: str = "k3", entropy: bool = True,
                 importance_sampling_mode: str = "token_truncate", importance_sampling_clip_min: float | None = None,
                 importance_sampling_clip_max: float | None = 3.0, temperature: float = 1.0,
                 softcap: float | None = None, ignore_index: int = -100, backend: str = "auto", **hparams):
        super().__init__()
        loss = L.resolve(loss)
        self.fn = L.get(loss)
        params = loss_params(self.fn)
        if "advantages" not in params:
            raise ValueError(f"loss {loss!r} is not a policy-gradient loss; use one of 'grpo', 'ppo_clip', 'gspo', "
                             "'cispo' (preference losses: PreferenceLoss)")
        if kl not in KL_MODES:
            raise ValueError(f"kl must be one of {KL_MODES}, got {kl!r}")
        if "kl_estimator" in hparams:
            raise ValueError("pass the KL estimator as kl=..., not kl_estimator")
        check_hparams(hparams, params, [loss])
        L.check_values({loss: self.fn}, hparams)
        if importance_sampling_mode not in L.rl.IMPORTANCE_SAMPLING_MODES:
            raise ValueError(f"importance_sampling_mode must be one of {L.rl.IMPORTANCE_SAMPLING_MODES}, "
                             f"got {importance_sampling_mode!r}")
        self.loss, self.kl, self.hparams = loss, kl, hparams
        self.beta = float(hparams.get("beta", 0.0))
        self.want_entropy = entropy or float(hparams.get("entropy_coef", 0.0)) != 0.0
        self.is_opts = dict(mode=importance_sampling_mode, clip_min=importance_sampling_clip_min,
                            clip_max=importance_sampling_clip_max)
        self.opts = dict(temperature=temperature, softcap=softcap, ignore_index=ignore_index, backend=backend)

    def forward(self, hidden: Tensor, weight: Tensor, labels: Tensor, *, advantages: Tensor,
                bias: Tensor | None = None, cu_seqlens: Tensor | None = None,
                old_token_logps: Tensor | None = None, sampler_token_logps: Tensor | None = None,
                ref_token_logps: Tensor | None = None, ref_hidden: Tensor | None = None,
                ref_weight: Tensor | None = None, ref_bias: Tensor | None = None, ref_softcap: float | None = None,
                num_items_in_batch: Tensor | float | None = None) -> LossOutput:
        """hidden [S, T, D] with labels [S, T] (shifted: labels[s, t] is the token sampled after hidden[s, t]; prompt
        and padding = ignore_index), or packed hidden [N, D] / [1, N, D], labels [N] / [1, N] and ``cu_seqlens``
        [S+1]. advantages: [S] per sequence or shaped like labels (per token). old / sampler / reference per-token
        log-probs are shaped like labels (detached; old None = one update per batch). Returns the loss (mean of
        ``losses`` [S], each sequence's share) and TRL-named metrics (``fastpref.losses.policy_metrics``).
        """
        ignore = self.opts["ignore_index"]
        if cu_seqlens is None and labels.dim() != 2:
            raise ValueError(f"labels must be [S, T] (or packed with cu_seqlens), got {tuple(labels.shape)}")
        for name, x in (("old_token_logps", old_token_logps), ("sampler_token_logps", sampler_token_logps),
                        ("ref_token_logps", ref_token_logps)):
            if x is not None and x.shape != labels.shape:
                raise ValueError(f"{name} must be shaped like labels {tuple(labels.shape)}, got {tuple(x.shape)}")
        logp, entropies, token_kl, ref_tok = self._token_stats(hidden, weight, labels, bias, ref_token_logps,
                                                               ref_hidden, ref_weight, ref_bias, ref_softcap)
        per_token = dict(token_logps=logp, entropies=entropies, token_kl=token_kl, ref_token_logps=ref_tok,
                         old_token_logps=old_token_logps, sampler_token_logps=sampler_token_logps)
        per_seq_adv = advantages.dim() == 1 and advantages.shape != labels.shape
        if cu_seqlens is None:
            mask = labels != ignore
        else:  # packed: per-token tensors to padded [S, T_max]
            mask = unpack(labels.reshape(-1), cu_seqlens, fill=ignore) != ignore
            per_token = {k: None if x is None else unpack(x.reshape(-1), cu_seqlens) for k, x in per_token.items()}
            if not per_seq_adv:
                advantages = unpack(advantages.reshape(-1), cu_seqlens)
        if per_seq_adv and advantages.shape != (mask.shape[0],):
            raise ValueError(f"advantages must be [S]=[{mask.shape[0]}] or shaped like labels, "
                             f"got {tuple(advantages.shape)}")
        sampler = per_token.pop("sampler_token_logps")
        ratio = None
        if sampler is not None:
            old = per_token["old_token_logps"]
            ratio = L.sampler_importance_ratio(per_token["token_logps"].detach() if old is None else old, sampler,
                                               mask, **self.is_opts)
        kw = {k: v for k, v in per_token.items() if v is not None}
        losses = self.fn(**kw, advantages=advantages, mask=mask, importance_sampling_ratio=ratio,
                         num_items_in_batch=num_items_in_batch, **self.hparams,
                         **({} if self.kl == "exact" else {"kl_estimator": self.kl}))
        if not int(mask.sum()):  # an empty or all-ignored batch: a zero loss that keeps the graph, no metrics
            _warn_once("PolicyLoss: a batch without a labelled token (empty, or every label ignore_index) gives "
                       "a zero loss")
            return LossOutput(zero_loss(hidden, weight), losses.detach() * 0.0, {})
        metric_hp = {k: self.hparams[k] for k in ("epsilon", "epsilon_high", "delta", "use_bias_correction_kl")
                     if k in self.hparams}
        metrics = L.policy_metrics(kw["token_logps"], advantages, kw.get("old_token_logps"), mask, loss=self.loss,
                                   entropies=kw.get("entropies"), ref_token_logps=kw.get("ref_token_logps"),
                                   token_kl=kw.get("token_kl"), **({} if self.kl == "exact" else
                                                                   {"kl_estimator": self.kl}), **metric_hp)
        return LossOutput(losses.mean(), losses, metrics)

    def _token_stats(self, hidden, weight, labels, bias, ref_token_logps, ref_hidden, ref_weight, ref_bias,
                     ref_softcap):
        """(log-probs, entropies or None, exact KL or None, reference log-probs or None), shaped like labels."""
        have_model = ref_hidden is not None and ref_weight is not None
        need_ref = self.beta != 0.0
        if need_ref and self.kl == "exact" and not have_model:
            raise ValueError("kl='exact' needs the reference model's ref_hidden and ref_weight (last hidden states "
                             "and lm_head)")
        if need_ref and ref_token_logps is None and not have_model:
            raise ValueError(f"beta={self.beta} needs reference log-probs: pass ref_token_logps, or ref_hidden and "
                             "ref_weight")
        entropies = ref_tok = None
        if need_ref and self.kl == "exact":
            out = token_kl(hidden, weight, ref_hidden, ref_weight, labels, bias=bias, ref_bias=ref_bias,
                           ref_softcap=ref_softcap, direction="reverse", **self.opts)
            if self.want_entropy:
                entropies = token_stats(hidden, weight, labels, bias=bias, entropy=True, **self.opts).entropy
            return out.logp, entropies, out.kl, None
        st = token_stats(hidden, weight, labels, bias=bias, entropy=self.want_entropy, **self.opts)
        if need_ref:
            ref_tok = ref_token_logps
            if ref_tok is None:
                ref_tok = reference_logprobs(ref_hidden, ref_weight, labels, ref_bias, ref_softcap, self.opts)
            ref_tok = ref_tok.detach()
        return st.logp, st.entropy, None, ref_tok
