"""Models: the tiny default policy, loading local Hugging Face models, and the base-model forward
that yields last hidden states (never logits) for packed or padded batches."""
from __future__ import annotations

import copy
import warnings
from typing import Callable

import torch
from torch import Tensor, nn


def tiny_model(vocab_size: int, seed: int, hidden: int = 96, layers: int = 2, heads: int = 4,
               max_positions: int = 128, num_labels: int | None = None) -> nn.Module:
    """A freshly initialised ~0.25M-parameter Llama built from a ``transformers`` config (deterministic);
    with ``num_labels`` a sequence classifier (a reward model with that many outputs)."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=max_positions, tie_word_embeddings=False, bos_token_id=2,
                      eos_token_id=3, pad_token_id=0, attn_implementation="sdpa", num_labels=num_labels or 2)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg) if num_labels is None else LlamaForSequenceClassification(cfg)


def hub_kernel_args() -> dict:
    """``from_pretrained`` keywords for Hugging Face hub kernels: transformers' own default (on) where its
    kernel-hub package is usable, off where it is not (transformers would then refuse to load any model)."""
    from transformers.utils import is_kernels_available

    return {} if is_kernels_available() else {"use_kernels": False}


def load_model(path: str, dtype: torch.dtype | None = None) -> nn.Module:
    """A local Hugging Face causal LM folder (safetensors weights; no remote code, no download)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, local_files_only=True,
                                                use_safetensors=True, attn_implementation="sdpa",
                                                **hub_kernel_args())


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen, eval-mode deep copy (the default reference model)."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def _is_dropout_rate(name: str, value: object) -> bool:
    """A float setting that names a dropout probability (``attention_dropout``, ``hidden_dropout_prob``,
    GPT-2's ``resid_pdrop``, ...)."""
    return isinstance(value, float) and not isinstance(value, bool) and ("dropout" in name or name.endswith("pdrop"))


def disable_dropout(model: nn.Module) -> Callable[[], None]:
    """Switch dropout off in ``model`` whatever its mode: every ``nn.Dropout``-like module gets p = 0, and so do
    the float dropout rates that modules keep as attributes (Hugging Face attention reads
    ``self.attention_dropout``) and those of the models' ``config`` (read by some models at forward time).
    Returns a function that puts the configs' values back (so a saved model keeps the user's settings)."""
    saved: list[tuple[object, str, float]] = []
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if _is_dropout_rate(name, value):
                setattr(module, name, 0.0)
        config = getattr(module, "config", None)
        if config is not None and id(config) not in seen:
            seen.add(id(config))
            for name, value in list(vars(config).items()):
                if _is_dropout_rate(name, value):
                    saved.append((config, name, value))
                    setattr(config, name, 0.0)

    def restore() -> None:
        for config, name, value in saved:
            setattr(config, name, value)

    return restore


def decoder(model: nn.Module) -> nn.Module:
    """The base model under the LM head (returns last hidden states, not logits)."""
    get = getattr(model, "get_decoder", None)
    base = get() if callable(get) else None
    if base is None or base is model:
        base = getattr(model, "model", None) or getattr(model, getattr(model, "base_model_prefix", ""), None)
    if base is None:
        raise ValueError(f"cannot find the base model under the LM head of {type(model).__name__}")
    return base


def head(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(weight [V, D], bias [V] or None) of the output embedding / lm_head."""
    lm = model.get_output_embeddings()
    return lm.weight, getattr(lm, "bias", None)


def final_softcap(model: nn.Module) -> float | None:
    """The model's final-logit soft-capping (e.g. Gemma 2), if any."""
    return getattr(model.config, "final_logit_softcapping", None)


def hidden_states(model: nn.Module, input_ids: Tensor, position_ids: Tensor,
                  attention_mask: Tensor | None = None) -> Tensor:
    """Last hidden states [B, T, D] of the base model. Packed rows: ``attention_mask=None`` and position ids
    restarting at 0 for every sequence (transformers builds the block-diagonal causal mask from them)."""
    out = decoder(model)(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                         use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


@torch.no_grad()
def packing_supported(model: nn.Module) -> bool:
    """Whether packed rows give the same hidden states as separate sequences for this model and attention
    implementation (probe on two short sequences)."""
    was = model.training
    model.eval()
    try:
        dev = next(model.parameters()).device
        v = model.get_input_embeddings().weight.shape[0]
        g = torch.Generator().manual_seed(0)
        a, b = torch.randint(4, v, (5,), generator=g).to(dev), torch.randint(4, v, (7,), generator=g).to(dev)
        pos = lambda n: torch.arange(n, device=dev)[None]  # noqa: E731
        packed = hidden_states(model, torch.cat([a, b])[None], torch.cat([pos(5), pos(7)], 1))[0].float()
        sep = torch.cat([hidden_states(model, a[None], pos(5))[0], hidden_states(model, b[None], pos(7))[0]])
        ok = torch.allclose(packed, sep.float(), atol=1e-3, rtol=1e-3)
    except Exception as e:  # noqa: BLE001 - any failure means: do not pack
        warnings.warn(f"packed forward failed ({type(e).__name__}: {e})")
        ok = False
    finally:
        model.train(was)
    return ok


def use_packing(model: nn.Module, mode: str, log) -> bool:
    """Whether to pack sequences: ``mode`` off / on / auto, where on and auto need :func:`packing_supported`
    (on: the run is refused without it; auto: a note, then padded batches)."""
    if mode == "off":
        return False
    ok = packing_supported(model)
    if not ok:
        msg = (f"packed sequences (position_ids restarting per sequence) are not supported by "
               f"{type(model).__name__} with attn_implementation="
               f"{getattr(model.config, '_attn_implementation', '?')} here")
        if mode == "on":
            raise SystemExit(msg)
        log(f"note: {msg}; falling back to padded batches")
    return ok


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute activations in the backward pass (non-reentrant), without the KV cache."""
    model.config.use_cache = False
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 renamed it
        model.activation_checkpointing_enable()
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
