"""Drop-in TRL trainers whose per-token statistics and loss go through fastpref.

TRL ≥ 1.x computes every log-prob of its DPO / KTO / GRPO / SFT trainers through one seam:
``trl.trainer.utils.add_fused_lm_head(model, ...)`` patches ``model.forward`` so that
``model(..., labels=labels, fused_lm_head=True)`` returns a ``FusedCausalLMOutput`` (log_probs, entropy,
log_sum_sq_probs, mean_logits, is_top1, aux_loss). The trainers here replace only that seam and the loss:

* :func:`add_fused_lm_head` (defined in :mod:`fastpref.integrations.trl_head`, which the GRPO trainer imports
  too) is a same-signature, same-output replacement computed by fastpref's primitive (the
  hidden states and the resolved output layer of :mod:`fastpref.integrations.transformers`: softcapping, logit
  scale, lm_head bias, PEFT LoRA / modules_to_save on lm_head, MoE aux loss).
* ``DPOTrainer`` / ``KTOTrainer`` construct themselves exactly like TRL's, except that the module-level
  ``add_fused_lm_head`` their ``__init__`` calls is fastpref's: so the policy forward, the reference forward (a
  separate ``ref_model`` or the PEFT base with adapters disabled) and ``precompute_ref_log_probs`` all go through
  fastpref, with every metric computed by TRL's own code from those outputs.
* ``DPOTrainer._compute_loss`` (the one method that turns log-probs into the loss) runs TRL's method unchanged —
  its metrics and logging included — while recording the fused outputs it requests, then recomputes the loss
  with ``fastpref.losses`` (every TRL ``loss_type``, lists with ``loss_weights``, f-divergences, ``ld_alpha``,
  ``use_weighting``, ``label_smoothing``, precomputed reference log-probs) and returns that. TRL's own value of the
  same loss, from the same tensors, is kept in ``trainer.fastpref_last["trl_loss"]`` as a built-in cross-check.
* ``RewardTrainer`` is ``trl.RewardTrainer`` whose ``compute_loss`` runs TRL's method unchanged (forward, metrics)
  and returns the Bradley-Terry loss recomputed from the same rewards by the registry loss ``bt`` (``margin``
  column, ``center_rewards_coefficient``). A reward model has a scalar head, so there is no fused-head memory gain
  there: what it buys is one loss implementation shared by every trainer.
* ``GRPOTrainer`` (:mod:`fastpref.integrations.trl_grpo`, re-exported here): TRL's GRPO with every log-prob and
  entropy from the fused head and the loss recomputed by ``fastpref.losses`` (``grpo`` / ``gspo`` / ``cispo``).

Requires TRL with ``add_fused_lm_head`` (1.10+; tested with 1.16).
"""
from __future__ import annotations

from typing import Any

import torch
import trl
from trl.trainer import dpo_trainer as _dpo_module

from .. import losses as L
from ..nn import loss_params
from .trl_head import _fastpref_head, _record, add_fused_lm_head

__all__ = ["DPOConfig", "DPOTrainer", "GRPOConfig", "GRPOTrainer", "KTOConfig", "KTOTrainer", "RewardConfig",
           "RewardTrainer", "add_fused_lm_head", "dpo_loss", "grpo_loss", "reward_loss"]
_GRPO_NAMES = ("GRPOConfig", "GRPOTrainer", "grpo_loss")  # defined in .trl_grpo (imported on first use)


def __getattr__(name: str):
    if name in _GRPO_NAMES:
        from . import trl_grpo

        return getattr(trl_grpo, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

DPOConfig = trl.DPOConfig
KTOConfig = getattr(trl, "KTOConfig", None)
RewardConfig = getattr(trl, "RewardConfig", None)

if not hasattr(_dpo_module, "add_fused_lm_head"):  # pragma: no cover - older TRL
    raise ImportError(f"fastpref.integrations.trl needs TRL with trl.trainer.utils.add_fused_lm_head (>= 1.10); "
                      f"found trl {trl.__version__}")

# --------------------------------------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------------------------------------
# f-divergences are applied by the losses themselves (those that take ``f_divergence_type``, as in TRL).
# The losses that read ``label_smoothing`` in TRL's DPOTrainer (``sigmoid`` ignores it there).
_SMOOTHED = {"robust", "exo_pair", "aot", "aot_unpaired"}


def _ld_sums(per_token: torch.Tensor, mask: torch.Tensor, ld_alpha: float | None) -> torch.Tensor:
    """Per-sequence sums of [2B, T] per-token log-probs, LD-DPO-mixed when ``ld_alpha`` is set (TRL semantics)."""
    if ld_alpha is None:
        return L.masked_sums(per_token, mask)[0]
    c, r = mask.chunk(2, dim=0)
    shared = L.ld_dpo_shared_lengths(c, r).repeat(2)
    head, tail = L.ld_dpo_partial_sums(per_token, mask, shared)
    return head + ld_alpha * tail


def dpo_loss(per_token_logps: torch.Tensor, completion_mask: torch.Tensor, *, loss_types, loss_weights=None,
             beta: float = 0.1, ref_chosen_logps=None, ref_rejected_logps=None, ref_per_token_logps=None,
             ld_alpha: float | None = None, f_divergence_type: str = "reverse_kl",
             f_alpha_divergence_coef: float = 0.5, label_smoothing: float = 0.0, discopop_tau: float = 0.05,
             log_sum_sq_probs: torch.Tensor | None = None) -> torch.Tensor:
    """TRL DPOTrainer's loss (TRL 1.16 semantics) computed by ``fastpref.losses``.

    per_token_logps [2B, T-1] (chosen rows first, 0 outside the completion), completion_mask [2B, T] (unshifted,
    as TRL's collator builds it). Reference: per-sequence ``ref_chosen_logps`` / ``ref_rejected_logps`` [B]
    (already LD-mixed, e.g. precomputed) or ``ref_per_token_logps`` like per_token_logps. ``log_sum_sq_probs``
    [2B, T-1] enables WPO weighting (``use_weighting``).
    """
    loss_types = [loss_types] if isinstance(loss_types, str) else list(loss_types)
    loss_weights = list(loss_weights) if loss_weights else [1.0] * len(loss_types)
    shift_mask = completion_mask[..., 1:].bool()
    seq_len = shift_mask.size(1)
    per_token_logps = per_token_logps[:, -seq_len:]
    logps = _ld_sums(per_token_logps, shift_mask, ld_alpha)
    chosen_logps, rejected_logps = logps.chunk(2, dim=0)
    if ref_chosen_logps is None:
        ref = _ld_sums(ref_per_token_logps[:, -seq_len:].detach(), shift_mask, ld_alpha)
        ref_chosen_logps, ref_rejected_logps = ref.chunk(2, dim=0)
    lengths = completion_mask.sum(dim=1)
    chosen_lengths, rejected_lengths = lengths.chunk(2, dim=0)
    pair = dict(chosen_logps=chosen_logps, rejected_logps=rejected_logps, ref_chosen_logps=ref_chosen_logps,
                ref_rejected_logps=ref_rejected_logps)
    hparams = dict(beta=beta, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
                   discopop_tau=discopop_tau, f_divergence_type=f_divergence_type,
                   f_alpha_divergence_coef=f_alpha_divergence_coef)
    weights = None
    if log_sum_sq_probs is not None:
        w = L.wpo_weights(per_token_logps.detach(), log_sum_sq_probs[:, -seq_len:], shift_mask)
        weights = w.chunk(2, dim=0)[0] * w.chunk(2, dim=0)[1]
    loss = per_token_logps.new_zeros((), dtype=torch.float32)
    for loss_type, loss_weight in zip(loss_types, loss_weights, strict=True):
        if loss_type == "sft":  # token-mean NLL of the chosen completions, on the raw (not LD-mixed) log-probs
            c_tok, _ = per_token_logps.chunk(2, dim=0)
            c_mask, _ = shift_mask.chunk(2, dim=0)
            per_seq = L.sft(chosen_logps=L.masked_sums(c_tok, c_mask)[0], chosen_lengths=c_mask.sum(-1))
        else:
            fn = L.get(loss_type)
            params = loss_params(fn)
            kw = {k: v for k, v in {**pair, **hparams}.items() if k in params}
            if loss_type in _SMOOTHED:
                kw["label_smoothing"] = label_smoothing
            per_seq = fn(**kw)
        if weights is not None:
            per_seq = per_seq * weights
        loss = loss + per_seq.mean() * loss_weight
    return loss


class DPOTrainer(trl.DPOTrainer):
    """``trl.DPOTrainer`` with fastpref's fused LM head and ``fastpref.losses``; same arguments, config, datasets
    and logged metrics. See the module docstring for what is replaced."""

    def __init__(self, *args, **kwargs):
        self.fastpref_last: dict[str, Any] = {}
        with _fastpref_head(_dpo_module):
            super().__init__(*args, **kwargs)

    def _compute_loss(self, model, inputs, return_outputs):
        with _record() as rec:
            result = super()._compute_loss(model, inputs, return_outputs)
        trl_loss, outputs = result if return_outputs else (result, None)
        policy = rec[0]  # the first fused forward of TRL's _compute_loss is the policy's; the next the reference's
        ref_kw: dict[str, Any]
        if self.precompute_ref_logps:
            ref_kw = dict(ref_chosen_logps=inputs["ref_chosen_logps"], ref_rejected_logps=inputs["ref_rejected_logps"])
        else:
            ref_kw = dict(ref_per_token_logps=rec[1].log_probs)
        loss = dpo_loss(policy.log_probs, inputs["completion_mask"], loss_types=self.loss_types,
                        loss_weights=self.loss_weights, beta=self.beta, ld_alpha=self.ld_alpha,
                        f_divergence_type=self.f_divergence_type,
                        f_alpha_divergence_coef=self.f_alpha_divergence_coef, label_smoothing=self.label_smoothing,
                        discopop_tau=self.args.discopop_tau,
                        log_sum_sq_probs=policy.log_sum_sq_probs if self.use_weighting else None, **ref_kw)
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * policy.aux_loss
        loss = loss.to(trl_loss.dtype) if torch.is_tensor(trl_loss) else loss
        self.fastpref_last = {"loss": loss.detach(), "trl_loss": trl_loss.detach() if torch.is_tensor(trl_loss)
                              else trl_loss}
        return (loss, outputs) if return_outputs else loss


# --------------------------------------------------------------------------------------------------------------------
# KTO: stable TRL API (trl.KTOTrainer); fastpref computes its per-token statistics, TRL its loss.
# --------------------------------------------------------------------------------------------------------------------
try:
    from trl.trainer import kto_trainer as _kto_module
except ImportError:  # pragma: no cover
    _kto_module = None

if _kto_module is not None and hasattr(_kto_module, "add_fused_lm_head") and hasattr(trl, "KTOTrainer"):

    class KTOTrainer(trl.KTOTrainer):
        """``trl.KTOTrainer`` whose policy, reference and KL-sample log-probs come from fastpref's fused head."""

        def __init__(self, *args, **kwargs):
            with _fastpref_head(_kto_module):
                super().__init__(*args, **kwargs)
else:  # pragma: no cover
    KTOTrainer = None


# --------------------------------------------------------------------------------------------------------------------
# Reward modelling: stable TRL API (trl.RewardTrainer); TRL's forward and metrics, fastpref's ``bt`` loss.
# --------------------------------------------------------------------------------------------------------------------
def reward_loss(rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor, *, margin: torch.Tensor | None = None,
                center_rewards_coefficient: float | None = None) -> torch.Tensor:
    """TRL RewardTrainer's loss (TRL 1.16 semantics) computed by the registry loss ``bt``, mean over the batch:
    mean(-logσ(r_w - r_l - m)) + c·mean((r_w + r_l)²), ``margin`` m [B] (the dataset's "margin" column; None = 0),
    c = ``center_rewards_coefficient`` (None = off). ``rewards_chosen`` / ``rewards_rejected`` [B]."""
    return L.get("bt")(chosen_rewards=rewards_chosen, rejected_rewards=rewards_rejected, margin=margin,
                       center_rewards_coefficient=center_rewards_coefficient).mean()


if hasattr(trl, "RewardTrainer"):

    class RewardTrainer(trl.RewardTrainer):
        """``trl.RewardTrainer`` whose loss is fastpref's ``bt``; same arguments, ``RewardConfig``, datasets (with or
        without a ``margin`` column), model (``AutoModelForSequenceClassification``, ``num_labels=1``) and metrics.

        ``compute_loss`` runs TRL's method unchanged (the forward and every metric it logs: ``num_tokens``,
        ``min_reward`` / ``mean_reward`` / ``max_reward``, ``accuracy``, ``margin``), then returns
        :func:`reward_loss` of the same rewards; TRL's own value is kept in ``fastpref_last["trl_loss"]`` as a
        cross-check. The model's head is a scalar score, not the vocabulary ``lm_head``: there is no fused-head
        memory gain here, only one loss implementation shared with every other trainer.
        """

        def __init__(self, *args, **kwargs):
            self.fastpref_last: dict[str, Any] = {}
            super().__init__(*args, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            trl_loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                     num_items_in_batch=num_items_in_batch)
            rewards_chosen, rewards_rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
            loss = reward_loss(rewards_chosen, rewards_rejected, margin=inputs.get("margin"),
                               center_rewards_coefficient=self.args.center_rewards_coefficient)
            loss = loss.to(trl_loss.dtype)
            self.fastpref_last = {"loss": loss.detach(), "trl_loss": trl_loss.detach()}
            return (loss, outputs) if return_outputs else loss
else:  # pragma: no cover
    RewardTrainer = None
