"""Hugging Face ``transformers`` causal LMs → per-token log-probs, statistics and KL, without [B, T, V] logits.

Every entry point runs the model's backbone (the decoder stack up to and including its final norm) to get the
last hidden states, resolves the output layer into the logit transform the model's own forward applies, and hands
both to the fused primitive. ``lm_head`` is never applied to all positions.

    z = cap(s · (h·Wᵀ + b)) / temperature

* ``W``, ``b``: ``model.get_output_embeddings()`` (tied embeddings included; a bias if the head has one);
* ``s``: the model's constant logit multiplier (Cohere ``logit_scale``, Granite ``1/logits_scaling``, ...),
  folded into the hidden states (and bias);
* ``cap``: ``final_logit_softcapping`` (Gemma 2/3), ``s·tanh(x/s)``;
* PEFT: the backbone runs with its adapters; a LoRA adapter on ``lm_head`` is folded in exactly (dropout
  included) by widening the contraction: ``[h, s_a·dropout(h)·Aᵀ] · [W, B]ᵀ = h·Wᵀ + s_a·B·A·dropout(h)``, so the
  gradients reach A and B through autograd; ``modules_to_save`` on ``lm_head`` uses the active copy.

Position ``t`` of every ``[B, T-1]`` output is about ``labels[:, t+1]`` predicted from tokens ``≤ t`` (the shift of
HF's causal-LM loss); positions whose shifted label is ``ignore_index`` (-100) are 0 and pass no gradient.
"""
from __future__ import annotations

import sys
import types
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor

from .. import kl as _kl
from .. import stats as _stats
from .._checks import gathered
from ..backends.torch_backend import logits_tile
from ..options import LogitOptions

__all__ = [
    "CausalLMStats", "CausalLMKL", "LMHead", "LogProbsOutput", "PatchHandle", "backbone_hidden_states",
    "causal_lm_logprobs", "lm_head", "logit_summaries", "patch_causal_lm", "token_kl", "token_logprobs",
    "token_stats", "unpatch_causal_lm", "unwrap_model",
]


# --------------------------------------------------------------------------------------------------------------------
# Model plumbing
# --------------------------------------------------------------------------------------------------------------------
def _is_peft(model) -> bool:
    return hasattr(model, "get_base_model") and hasattr(model, "peft_config")


def unwrap_model(model):
    """The ``transformers`` model under PEFT / DDP-style wrappers (adapters stay injected in its modules)."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if _is_peft(model):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module) and not hasattr(model, "config"):
            model = model.module
    return model


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _logit_scale(config) -> float:
    """The constant the model's forward multiplies its logits by (before softcapping), 1.0 if none."""
    model_type = getattr(config, "model_type", "")
    scale = getattr(config, "logit_scale", None)  # Cohere, Cohere2: logits * logit_scale
    if scale is None:
        scale = getattr(config, "output_multiplier", None)
    if scale is None:
        scale = getattr(config, "lm_head_multiplier", None)  # Falcon-H1
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        # Granite / GraniteMoE / MiniCPM3 divide by it; HyperCLOVA X multiplies
        scale = config.logits_scaling if model_type == "hyperclovax" else 1.0 / config.logits_scaling
    return 1.0 if scale is None else float(scale)


def _backbone(model):
    """The module that returns ``last_hidden_state`` (the decoder stack with its final norm)."""
    base = model.base_model  # transformers: getattr(self, base_model_prefix, self)
    if base is model:
        raise TypeError(f"{type(model).__name__} has no separate backbone (base_model_prefix="
                        f"{getattr(model, 'base_model_prefix', None)!r}); pass a *ForCausalLM model")
    return base


def backbone_hidden_states(model, input_ids=None, attention_mask=None, **model_kwargs):
    """Run the backbone of ``model`` (PEFT adapters active) → its output (``last_hidden_state``, router logits, ...).

    MoE models whose config sets ``output_router_logits`` return their router logits, as their own forward does.
    """
    hf = unwrap_model(model)
    cfg = _text_config(hf)
    model_kwargs.setdefault("use_cache", False)
    if getattr(cfg, "output_router_logits", False):
        model_kwargs.setdefault("output_router_logits", True)
    if input_ids is not None:
        model_kwargs["input_ids"] = input_ids
    if attention_mask is not None:
        model_kwargs["attention_mask"] = attention_mask
    return _backbone(hf)(**model_kwargs)


def _aux_loss(model, backbone_out, attention_mask) -> Tensor | None:
    """The MoE load-balancing loss exactly as the model's own forward computes it (None for dense models)."""
    router_logits = getattr(backbone_out, "router_logits", None)
    if router_logits is None:
        return None
    hf = unwrap_model(model)
    cfg = _text_config(hf)
    module = sys.modules.get(type(hf).__module__)
    fn = getattr(module, "load_balancing_loss_func", None)
    if fn is None:
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func as fn
    n_exp = getattr(hf, "num_experts", None) or getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts")
    top_k = getattr(hf, "num_experts_per_tok", None) or getattr(cfg, "num_experts_per_tok")
    return fn(router_logits, n_exp, top_k, attention_mask)


@dataclass
class LMHead:
    """An output layer resolved into the fused primitive's terms: z = cap(hidden_transform(h)·weightᵀ + bias)/T.

    ``lora``: (A-weight [r, D], scaling, dropout module) per active LoRA adapter on ``lm_head``; their B-weights
    are already concatenated to ``weight`` (V × (D + Σr)). ``scale``: logit multiplier folded into hidden and bias.
    """

    weight: Tensor
    bias: Tensor | None
    softcap: float | None
    scale: float
    lora: tuple = ()

    def hidden(self, h: Tensor) -> Tensor:
        """The hidden states the (widened, scaled) weight contracts with."""
        if self.lora:
            parts = [h]
            for a_w, scaling, dropout in self.lora:
                parts.append(torch.nn.functional.linear(dropout(h.to(a_w.dtype)), a_w).to(h.dtype) * scaling)
            h = torch.cat(parts, dim=-1)
        return h * self.scale if self.scale != 1.0 else h


def _peft_lora_head(layer) -> tuple[Tensor, Tensor | None, tuple]:
    """(weight, bias, lora) of a PEFT LoRA ``Linear`` on the output layer, following its forward exactly."""
    base = layer.get_base_layer()
    weight, bias = gathered(base.weight), gathered(getattr(base, "bias", None))
    if getattr(layer, "disable_adapters", False) or getattr(layer, "merged", False):
        return weight, bias, ()
    if getattr(layer, "fan_in_fan_out", False):
        raise NotImplementedError("fastpref: LoRA on lm_head with fan_in_fan_out=True is not supported")
    extra_w, lora = [], []
    extra_b = None
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        if name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name, False):
            raise NotImplementedError(f"fastpref: LoRA variant (DoRA, ...) on lm_head (adapter {name!r}) is not "
                                      "supported; use plain LoRA or compute logits the naive way")
        a, b, s = layer.lora_A[name], layer.lora_B[name], layer.scaling[name]
        if not isinstance(a, torch.nn.Linear) or not isinstance(b, torch.nn.Linear):
            raise NotImplementedError(f"fastpref: LoRA on lm_head with {type(a).__name__} adapters is not supported")
        lora.append((gathered(a.weight), s, layer.lora_dropout[name]))
        extra_w.append(gathered(b.weight).to(weight.dtype))
        if b.bias is not None:
            b_bias = gathered(b.bias)
            extra_b = (b_bias * s) if extra_b is None else extra_b + b_bias * s
    if extra_w:
        weight = torch.cat([weight, *extra_w], dim=1)
    if extra_b is not None:
        bias = extra_b.to(weight.dtype) if bias is None else bias + extra_b.to(bias.dtype)
    return weight, bias, tuple(lora)


def _shape(param: Tensor) -> tuple:
    """A parameter's shape; ``ds_shape`` for a ZeRO-3 partitioned one (its local ``.data`` is empty)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def lm_head(model) -> LMHead:
    """Resolve ``model``'s output layer (PEFT-aware) and logit transform. Gradients flow to every parameter used.

    Sharded parameters (an FSDP2 DTensor, a DeepSpeed ZeRO-3 partitioned parameter) come back gathered, see
    :func:`fastpref._checks.gathered`.
    """
    hf = unwrap_model(model)
    cfg = _text_config(hf)
    head = hf.get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(hf).__name__} has no output embeddings (get_output_embeddings() is None)")
    lora: tuple = ()
    kind = type(head).__name__
    if hasattr(head, "lora_A") and hasattr(head, "get_base_layer"):  # peft.tuners.lora.Linear
        weight, bias, lora = _peft_lora_head(head)
    elif hasattr(head, "modules_to_save") and hasattr(head, "original_module"):  # peft ModulesToSaveWrapper
        active = [a for a in head.active_adapters if a in head.modules_to_save]
        mod = head.original_module if head.disable_adapters or not active else head.modules_to_save[active[0]]
        weight, bias = gathered(mod.weight), gathered(getattr(mod, "bias", None))
    elif hasattr(head, "get_base_layer"):  # another PEFT tuner on lm_head
        raise NotImplementedError(f"fastpref: PEFT layer {kind} on lm_head is not supported")
    elif isinstance(getattr(head, "weight", None), Tensor) and len(_shape(head.weight)) == 2:
        weight, bias = gathered(head.weight), gathered(getattr(head, "bias", None))
    else:
        raise NotImplementedError(f"fastpref: output layer {kind} is not a linear layer")
    softcap = getattr(cfg, "final_logit_softcapping", None)
    return LMHead(weight, bias, float(softcap) if softcap else None, _logit_scale(cfg), lora)


def _shift(hidden: Tensor, labels: Tensor, shift_labels: Tensor | None) -> tuple[Tensor, Tensor]:
    if shift_labels is not None:
        return hidden, shift_labels
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels must be shaped like input_ids {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}")
    return hidden[:, :-1], labels[:, 1:]


def _head_inputs(head: LMHead, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    h = head.hidden(hidden.to(head.weight.device))
    bias = head.bias
    if bias is not None and head.scale != 1.0:
        bias = bias * head.scale
    return h, head.weight, bias


# --------------------------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class CausalLMStats:
    """Per-token statistics of a causal LM, float32 [B, T-1] (0 where the shifted label is ignored).

    logp: log p(labels[:, t+1] | ≤ t); lse: log-sum-exp of the logits; entropy / log_sum_p2: when asked;
    aux_loss: the MoE load-balancing loss (None for dense models); outputs: the backbone's output object.
    """

    logp: Tensor
    lse: Tensor
    entropy: Tensor | None = None
    log_sum_p2: Tensor | None = None
    aux_loss: Tensor | None = None
    outputs: Any = None


def token_stats(model, input_ids: Tensor | None, labels: Tensor, attention_mask: Tensor | None = None, *,
                temperature: float = 1.0, entropy: bool = False, log_sum_p2: bool = False,
                ignore_index: int = -100, backend: str = "auto", shift_labels: Tensor | None = None,
                **model_kwargs) -> CausalLMStats:
    """Per-token log-prob, log-sum-exp (and entropy / log Σp² when asked) of a HF causal LM, fused.

    ``labels`` [B, T] as for HF's causal-LM loss (-100 = ignored); or pass ``shift_labels`` [B, T] already
    shifted (context/sequence parallel), then outputs are [B, T]. Extra keyword arguments go to the backbone
    (``position_ids``, ``inputs_embeds``, ``pixel_values``, ...).
    """
    out = backbone_hidden_states(model, input_ids, attention_mask, **model_kwargs)
    head = lm_head(model)
    hidden, lab = _shift(out.last_hidden_state, labels, shift_labels)
    h, w, b = _head_inputs(head, hidden)
    st = _stats.token_stats(h, w, lab.to(h.device), bias=b, temperature=temperature, softcap=head.softcap,
                            ignore_index=ignore_index, entropy=entropy, log_sum_p2=log_sum_p2, backend=backend)
    return CausalLMStats(st.logp, st.lse, st.entropy, st.log_sum_p2, _aux_loss(model, out, attention_mask), out)


def token_logprobs(model, input_ids: Tensor | None, labels: Tensor, attention_mask: Tensor | None = None,
                   **options) -> Tensor:
    """float32 [B, T-1]: element t is log p(labels[:, t+1] | tokens ≤ t), 0 where labels[:, t+1] == -100.

    Same as ``model(...).logits[:, :-1].log_softmax(-1).gather(-1, labels[:, 1:])`` (temperature, softcapping,
    logit scale and a LoRA head included) without the logits. Options: see :func:`token_stats`.
    """
    return token_stats(model, input_ids, labels, attention_mask, **options).logp


@dataclass
class CausalLMKL:
    """Per-token full-vocabulary KL between a policy and a reference causal LM, float32 [B, T-1].

    kl: KL(π_ref‖π_θ) ("forward") or KL(π_θ‖π_ref) ("reverse"); logp / ref_logp: log-probs of the labels;
    aux_loss: the policy's MoE load-balancing loss (None for dense models).
    """

    kl: Tensor
    logp: Tensor
    ref_logp: Tensor
    aux_loss: Tensor | None = None


def token_kl(model, ref_model, input_ids: Tensor | None, labels: Tensor | None = None,
             attention_mask: Tensor | None = None, *, direction: str = "forward", temperature: float = 1.0,
             ignore_index: int = -100, backend: str = "auto", **model_kwargs) -> CausalLMKL:
    """Full-vocabulary KL per token between ``model`` (gets gradients) and ``ref_model`` (run under no_grad).

    ``labels`` default to ``input_ids`` with padding (``attention_mask == 0``) ignored. The two models must share
    the vocabulary; their hidden sizes may differ.
    """
    if labels is None:
        if input_ids is None:
            raise ValueError("token_kl needs labels when input_ids is None")
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, ignore_index)
    out = backbone_hidden_states(model, input_ids, attention_mask, **model_kwargs)
    head = lm_head(model)
    with torch.no_grad():
        ref_kwargs = {k: v for k, v in model_kwargs.items() if k != "output_router_logits"}
        ref_out = backbone_hidden_states(ref_model, input_ids, attention_mask, **ref_kwargs)
        ref_head = lm_head(ref_model)
        rh, rw, rb = _head_inputs(ref_head, ref_out.last_hidden_state[:, :-1])
    h, w, b = _head_inputs(head, out.last_hidden_state[:, :-1])
    lab = labels[:, 1:].to(h.device)
    res = _kl.token_kl(h, w, rh.to(h.device), rw.to(h.device), lab, bias=b,
                       ref_bias=None if rb is None else rb.to(h.device), direction=direction,
                       temperature=temperature, softcap=head.softcap, ref_softcap=ref_head.softcap,
                       ignore_index=ignore_index, backend=backend)
    return CausalLMKL(res.kl, res.logp, res.ref_logp, _aux_loss(model, out, attention_mask))


@torch.no_grad()
def logit_summaries(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None = None,
                    softcap: float | None = None, temperature: float = 1.0, row_chunk: int = 1024,
                    vocab_chunk: int = 8192) -> tuple[Tensor, Tensor]:
    """No-grad (mean logit over the vocabulary, label is the first argmax) per row of ``hidden`` [N, D].

    Streams over (row, vocabulary) tiles, so memory stays O(row_chunk · vocab_chunk). Without softcapping the mean
    is exact in O(N·D): mean_v(h·W_v + b_v) = h·mean(W) + mean(b). Logits: z = cap(h·Wᵀ + b)/T. float32 outputs.
    """
    N, V = hidden.shape[0], weight.shape[0]
    h, w = hidden.float(), weight.float()
    b = None if bias is None else bias.float()
    opts = LogitOptions(temperature, softcap)
    lab = labels.long().clamp(0, V - 1)
    top1 = torch.zeros(N, dtype=torch.bool, device=h.device)
    mean = torch.zeros(N, dtype=torch.float32, device=h.device)
    for r0 in range(0, N, row_chunk):
        hr, lr = h[r0:r0 + row_chunk], lab[r0:r0 + row_chunk]
        best = torch.full((hr.shape[0],), -torch.inf, device=h.device)
        arg = torch.zeros(hr.shape[0], dtype=torch.long, device=h.device)
        zsum = torch.zeros(hr.shape[0], device=h.device)
        for v0 in range(0, V, vocab_chunk):
            z, _ = logits_tile(hr, w[v0:v0 + vocab_chunk], None if b is None else b[v0:v0 + vocab_chunk], opts)
            if softcap is not None:
                zsum += z.sum(-1)
            m, i = z.max(-1)  # first maximum within the tile
            better = m > best  # strict: an earlier tile keeps ties (argmax's first-maximum rule)
            best, arg = torch.where(better, m, best), torch.where(better, i + v0, arg)
        top1[r0:r0 + row_chunk] = arg == lr
        if softcap is not None:
            mean[r0:r0 + row_chunk] = zsum / V
    if softcap is None:
        mean = (h @ w.mean(0) + (0.0 if b is None else b.mean())) / temperature
    return mean, top1


# --------------------------------------------------------------------------------------------------------------------
# Patching model.forward
# --------------------------------------------------------------------------------------------------------------------
try:  # a ModelOutput when transformers is importable, so outputs behave like HF's (dict + attribute access)
    from transformers.utils import ModelOutput as _Base
except ImportError:  # pragma: no cover
    _Base = object


@dataclass
class LogProbsOutput(_Base):
    """What a patched causal LM returns when called with labels: per-token log-probs instead of logits.

    loss: HF's causal-LM loss (mean NLL over non-ignored tokens, or sum / ``num_items_in_batch``) plus
    ``router_aux_loss_coef · aux_loss`` when router logits are returned; log_probs / lse / entropy: [B, T-1];
    logits: always None.
    """

    loss: Tensor | None = None
    logits: Tensor | None = None
    log_probs: Tensor | None = None
    lse: Tensor | None = None
    entropy: Tensor | None = None
    aux_loss: Tensor | None = None
    hidden_states: Any = None
    attentions: Any = None
    router_logits: Any = None


@dataclass
class PatchHandle:
    """Returned by :func:`patch_causal_lm`; ``unpatch()`` (or leaving the ``with`` block) restores the model."""

    model: Any
    forward: Any
    previous: Any

    def unpatch(self) -> None:
        unpatch_causal_lm(self.model)

    def __enter__(self):
        return self.model

    def __exit__(self, *exc):
        self.unpatch()
        return False


_PATCH_ATTR = "_fastpref_patch"


def patch_causal_lm(model, *, temperature: float = 1.0, entropy: bool = False, backend: str = "auto",
                    ignore_index: int = -100) -> PatchHandle:
    """Make ``model(input_ids, labels=..., ...)`` return a :class:`LogProbsOutput` (log-probs, ``logits=None``).

    Calls without ``labels`` (generation, plain inference) run the original forward. Works on PEFT models (the
    wrapped ``transformers`` model is patched, adapters keep working). Undo with ``handle.unpatch()``,
    :func:`unpatch_causal_lm`, or use the handle as a context manager. Patching twice raises.
    """
    hf = unwrap_model(model)
    if getattr(hf, _PATCH_ATTR, None) is not None:
        raise RuntimeError("model is already patched by fastpref; unpatch it first")
    previous = hf.__dict__.get("forward")  # an instance-level forward someone else installed, or None
    original = hf.forward
    cfg = _text_config(hf)

    def forward(self, *args, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if labels is None and shift_labels is None:
            return original(*args, **kwargs)
        if args:  # positional input_ids (the only positional argument HF callers use)
            kwargs["input_ids"] = args[0]
            if len(args) > 1:
                kwargs["attention_mask"] = args[1]
        kwargs.pop("logits_to_keep", None)
        kwargs.pop("return_dict", None)
        attention_mask = kwargs.get("attention_mask")
        st = token_stats(self, kwargs.pop("input_ids", None), labels if labels is not None else shift_labels,
                         kwargs.pop("attention_mask", None), temperature=temperature, entropy=entropy,
                         ignore_index=ignore_index, backend=backend, shift_labels=shift_labels, **kwargs)
        lab = shift_labels if shift_labels is not None else labels[:, 1:]
        count = (lab != ignore_index).sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -st.logp.sum() / count
        if st.aux_loss is not None:
            loss = loss + getattr(cfg, "router_aux_loss_coef", 0.0) * st.aux_loss.to(loss.device)
        del attention_mask
        o = st.outputs
        return LogProbsOutput(loss=loss, logits=None, log_probs=st.logp, lse=st.lse, entropy=st.entropy,
                              aux_loss=st.aux_loss, hidden_states=getattr(o, "hidden_states", None),
                              attentions=getattr(o, "attentions", None),
                              router_logits=getattr(o, "router_logits", None))

    bound = types.MethodType(forward, hf)
    hf.forward = bound
    handle = PatchHandle(hf, bound, previous)
    setattr(hf, _PATCH_ATTR, handle)
    return handle


def unpatch_causal_lm(model) -> None:
    """Undo :func:`patch_causal_lm` (no-op on an unpatched model)."""
    hf = unwrap_model(model)
    handle = hf.__dict__.get(_PATCH_ATTR)
    if handle is None:
        return
    if handle.previous is None:
        hf.__dict__.pop("forward", None)
    else:
        hf.forward = handle.previous
    del hf.__dict__[_PATCH_ATTR]


@contextmanager
def causal_lm_logprobs(model, **options) -> Iterator[Any]:
    """``with causal_lm_logprobs(model): out = model(input_ids, labels=labels)`` → ``out.log_probs``."""
    handle = patch_causal_lm(model, **options)
    try:
        yield model
    finally:
        handle.unpatch()
