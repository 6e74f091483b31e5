"""The seam every fastpref TRL trainer replaces: :func:`add_fused_lm_head` (same signature and output as
``trl.trainer.utils.add_fused_lm_head``, computed by fastpref), a context that makes a TRL trainer module's
``__init__`` call it, and a per-thread recorder of the fused outputs a loss method requests. Shared by
:mod:`fastpref.integrations.trl` and :mod:`fastpref.integrations.trl_grpo` (which import this module, not each
other's)."""
from __future__ import annotations

import functools
import threading
import types
from contextlib import contextmanager, nullcontext

import torch
from trl.trainer.utils import FusedCausalLMOutput

from .. import stats as _stats
from . import transformers as fi

_TLS = threading.local()


def _recorder() -> list | None:
    return getattr(_TLS, "recorder", None)


@contextmanager
def _record():
    """Collect the FusedCausalLMOutput of every fused forward run in this thread inside the block."""
    prev = _recorder()
    _TLS.recorder = rec = []
    try:
        yield rec
    finally:
        _TLS.recorder = prev


def add_fused_lm_head(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                      outputs: tuple[str, ...] = ("log_probs",), *, backend: str = "auto") -> None:
    """fastpref's replacement for ``trl.trainer.utils.add_fused_lm_head`` (same signature and output).

    ``model(..., labels=labels, fused_lm_head=True)`` returns a ``FusedCausalLMOutput`` whose per-token fields
    ([B, T-1], or [B, T] with ``shift_labels``; 0 where the label is -100) come from fastpref: log_probs,
    entropy and log_sum_sq_probs from one fused pass with gradients; mean_logits and is_top1 (metrics, no
    gradient) from a streamed no-grad pass over (row, vocabulary) tiles, run only when asked for. Without
    ``fused_lm_head`` the original forward runs (generation is unchanged).
    """
    original_forward = model.forward
    cfg = fi._text_config(model)
    want_entropy = "entropy" in outputs
    want_p2 = "log_sum_sq_probs" in outputs
    want_mean, want_top1 = "mean_logits" in outputs, "is_top1" in outputs

    @functools.wraps(type(model).forward)
    def _fused_forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                       **kwargs):
        if not fused_lm_head:
            for k, v in (("labels", labels), ("shift_labels", shift_labels), ("num_items_in_batch",
                                                                                 num_items_in_batch)):
                if v is not None:
                    kwargs[k] = v
            return original_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        if getattr(cfg, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        backbone_out = fi._backbone(self)(*args, **kwargs)
        head = fi.lm_head(self)
        hidden, lab = fi._shift(backbone_out.last_hidden_state, labels, shift_labels)
        lab = lab.to(head.weight.device)
        autocast = nullcontext()
        if cast_lm_head_to_fp32:
            hidden = hidden.float()
            autocast = torch.autocast(hidden.device.type, enabled=False)
        with autocast:
            h, w, b = fi._head_inputs(head, hidden)
            st = _stats.token_stats(h, w, lab, bias=b, temperature=temperature, softcap=head.softcap,
                                    entropy=want_entropy, log_sum_p2=want_p2, backend=backend)
        mask = lab != -100
        mean_logits = is_top1 = None
        if want_mean or want_top1:
            ww = w if not cast_lm_head_to_fp32 else w.float()
            m, t1 = fi.logit_summaries(h[mask], ww, lab[mask], bias=b, softcap=head.softcap,
                                       temperature=temperature)
            mean_logits = m.new_zeros(mask.shape).masked_scatter(mask, m) if want_mean else None
            is_top1 = t1.new_zeros(mask.shape).masked_scatter(mask, t1) if want_top1 else None
        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -st.logp.sum() / denom
        aux_loss = None
        if kwargs.get("output_router_logits"):
            aux_loss = fi._aux_loss(self, backbone_out, kwargs.get("attention_mask"))
            loss = loss + getattr(cfg, "router_aux_loss_coef", 0.0) * aux_loss
        out = FusedCausalLMOutput(loss=loss, log_probs=st.logp, entropy=st.entropy, log_sum_sq_probs=st.log_sum_p2,
                                  mean_logits=mean_logits, is_top1=is_top1, label_mask=mask, aux_loss=aux_loss)
        rec = _recorder()
        if rec is not None:
            rec.append(out)
        return out

    _fused_forward._fastpref = True
    model.forward = types.MethodType(_fused_forward, model)


_SWAP_LOCK = threading.RLock()


@contextmanager
def _fastpref_head(module):
    """Within the block, ``module.add_fused_lm_head`` (the name a TRL trainer's ``__init__`` calls) is fastpref's."""
    with _SWAP_LOCK:
        saved = module.add_fused_lm_head
        module.add_fused_lm_head = add_fused_lm_head
        try:
            yield
        finally:
            module.add_fused_lm_head = saved
