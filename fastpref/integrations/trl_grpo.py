"""Drop-in ``trl.GRPOTrainer`` whose per-token log-probs, entropies and loss go through fastpref.

``GRPOTrainer`` constructs itself exactly like TRL's (same ``GRPOConfig``, reward functions, generation,
datasets, PEFT handling), except that the ``add_fused_lm_head`` its ``__init__`` calls is fastpref's (see
:mod:`fastpref.integrations.trl`): every log-prob TRL asks for (the policy at the loss step with its entropies,
the old policy and the reference at generation time) comes from fastpref's fused head, never from
[tokens × vocab] logits. ``_compute_loss`` runs TRL's method unchanged — its metrics and logging included —
while recording the policy's fused outputs, then recomputes the loss with :func:`grpo_loss` (``fastpref.losses``:
``grpo`` / ``gspo`` / ``cispo``) from the same tensors and returns that; TRL's own value stays in
``trainer.fastpref_last["trl_loss"]`` as a built-in cross-check.

Recomputed: ``loss_type`` grpo, bnpo, dr_grpo, dapo, cispo; ``importance_sampling_level`` token or sequence
(GSPO); ``epsilon`` / ``epsilon_high`` / ``delta``; ``beta`` with ``use_bias_correction_kl``; the vLLM
importance-sampling ratio; ``entropy_coef`` (static or adaptive); gradient accumulation; the MoE aux loss.
Other options (``sapo``, ``vespo``, ``luspo``, ``top_entropy_quantile`` < 1, ``off_policy_mask_threshold``) keep
TRL's loss — still computed from fastpref's log-probs — and ``fastpref_last["loss_from"]`` says so.
"""
from __future__ import annotations

from typing import Any

import torch
import trl
from trl.trainer import grpo_trainer as _grpo_module

from .. import losses as L
from .trl_head import _fastpref_head, _record

__all__ = ["GRPOConfig", "GRPOTrainer", "grpo_loss"]

GRPOConfig = trl.GRPOConfig
_RECOMPUTED = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")


def grpo_loss(per_token_logps: torch.Tensor, completion_mask: torch.Tensor, advantages: torch.Tensor, *,
              loss_type: str = "dapo", importance_sampling_level: str = "token",
              old_per_token_logps: torch.Tensor | None = None, ref_per_token_logps: torch.Tensor | None = None,
              importance_sampling_ratio: torch.Tensor | None = None, entropies: torch.Tensor | None = None,
              beta: float = 0.0, epsilon: float = 0.2, epsilon_high: float | None = None, delta: float | None = None,
              use_bias_correction_kl: bool = True, entropy_coef: float = 0.0, max_completion_length: int | None = None,
              num_items_in_batch: torch.Tensor | float | None = None, accumulation_steps: int = 1) -> torch.Tensor:
    """TRL GRPOTrainer's loss (TRL 1.16 semantics, ``GRPOConfig`` names) computed by ``fastpref.losses``.

    per_token_logps / old / ref / entropies: [B, T] over the completion tokens; completion_mask [B, T];
    advantages [B] or [B, T]; importance_sampling_ratio [B, T] or [B, 1] (the vLLM correction).
    ``loss_type`` "cispo" → :func:`fastpref.losses.cispo` (ε_max = ``epsilon_high``); level "sequence" →
    :func:`fastpref.losses.gspo`; otherwise :func:`fastpref.losses.grpo`. ``num_items_in_batch``: the dapo / cispo
    normaliser as TRL forms it (tokens of the generation batch per process, times accumulation steps over
    ``steps_per_generation`` in training); grpo / bnpo / dr_grpo and the entropy bonus are divided by
    ``accumulation_steps``. Returns the scalar loss.
    """
    eps_high = epsilon if epsilon_high is None else epsilon_high
    if loss_type == "cispo":
        if importance_sampling_level != "token":
            raise ValueError("cispo is computed with token-level ratios here (importance_sampling_level='token')")
        name, hp = "cispo", dict(epsilon_high=eps_high)
    else:
        name = "gspo" if importance_sampling_level == "sequence" else "grpo"
        hp = dict(epsilon=epsilon, epsilon_high=eps_high, delta=delta)
    per_seq = L.get(name)(
        token_logps=per_token_logps, advantages=advantages, old_token_logps=old_per_token_logps,
        mask=completion_mask, importance_sampling_ratio=importance_sampling_ratio,
        ref_token_logps=ref_per_token_logps, beta=beta, use_bias_correction_kl=use_bias_correction_kl,
        loss_type="dapo" if loss_type == "cispo" else loss_type, max_completion_length=max_completion_length,
        num_items_in_batch=num_items_in_batch, **hp)
    loss = per_seq.mean()
    if loss_type not in ("dapo", "cispo"):
        loss = loss / accumulation_steps
    if entropy_coef != 0.0:
        loss = loss - entropy_coef * L.entropy_bonus(entropies, completion_mask).mean() / accumulation_steps
    return loss


class GRPOTrainer(trl.GRPOTrainer):
    """``trl.GRPOTrainer`` with fastpref's fused LM head and ``fastpref.losses``; same arguments, ``GRPOConfig``,
    reward functions, generation and logged metrics. See the module docstring for what is replaced."""

    def __init__(self, *args, **kwargs):
        self.fastpref_last: dict[str, Any] = {}
        with _fastpref_head(_grpo_module):
            super().__init__(*args, **kwargs)

    def _fastpref_recomputes(self) -> bool:
        return (self.loss_type in _RECOMPUTED and self.top_entropy_quantile >= 1.0
                and self.off_policy_mask_threshold is None
                and not (self.loss_type == "cispo" and self.importance_sampling_level != "token"))

    def _compute_loss(self, model, inputs):
        training = self.model.training
        accumulation = self.current_gradient_accumulation_steps if training else 1
        entropy_coef = 0.0  # the coefficient TRL applies in this call (read before TRL's adaptive update)
        if self._entropy_bonus_enabled:
            entropy_coef = self.entropy_coef
            if self.use_adaptive_entropy and self._last_world_entropy > self.args.entropy_target:
                entropy_coef = 0.0
        with _record() as rec:
            trl_loss = super()._compute_loss(model, inputs)
        if not rec or not self._fastpref_recomputes():  # no fused forward seen (a custom model forward): TRL's
            self.fastpref_last = {"loss": trl_loss.detach(), "trl_loss": trl_loss.detach(), "loss_from": "trl"}
            return trl_loss
        T = inputs["completion_ids"].size(1)
        policy = rec[0]  # the policy forward of TRL's _compute_loss (one chunk: batch_size=None there)
        logps, entropies = policy.log_probs[:, -T:], policy.entropy[:, -T:]
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        num_items = None
        if self.loss_type in ("dapo", "cispo"):
            num_items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if training:
                num_items = num_items * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        use_is = self.use_vllm and self.vllm_importance_sampling_correction
        loss = grpo_loss(
            logps, mask, inputs["advantages"], loss_type=self.loss_type,
            importance_sampling_level=self.importance_sampling_level,
            old_per_token_logps=inputs.get("old_per_token_logps"),
            ref_per_token_logps=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
            importance_sampling_ratio=inputs["importance_sampling_ratio"] if use_is else None, entropies=entropies,
            beta=self.beta, epsilon=self.epsilon_low, epsilon_high=self.epsilon_high, delta=self.args.delta,
            use_bias_correction_kl=self.args.use_bias_correction_kl, entropy_coef=entropy_coef,
            max_completion_length=self.max_completion_length, num_items_in_batch=num_items,
            accumulation_steps=accumulation)
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * policy.aux_loss / accumulation
        loss = loss.to(trl_loss.dtype)
        self.fastpref_last = {"loss": loss.detach(), "trl_loss": trl_loss.detach(), "loss_from": "fastpref"}
        return loss
