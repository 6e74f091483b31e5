"""The fused ops as torch custom ops: opaque to torch.compile, with fake (shape) functions and autograd.

Backends are named by string (resolved once by the public functions); options travel as plain scalars.
Outputs a caller did not ask for are empty [0] tensors (custom ops cannot return None).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _frozen, backends
from .options import LogitOptions

_NONE = 0  # placeholder length of an absent output


def _f32(n: int, like: Tensor) -> Tensor:
    return like.new_empty(n, dtype=torch.float32)


def _opt(t: Tensor | None) -> Tensor | None:
    """Empty tensors stand for "absent"."""
    return None if t is None or t.numel() == 0 else t


def _grads_out(grads, inputs) -> tuple[Tensor, Tensor, Tensor]:
    """Backend gradients (None where not needed) → tensors in the input dtypes, empty where absent."""
    like = inputs[0]
    return tuple(like.new_empty(0) if (g is None or x is None) else g.to(x.dtype) for g, x in zip(grads, inputs))


def _zero_grads_fake(hidden, weight, bias, needs):
    return tuple(torch.empty_like(x) if (n and x is not None) else (hidden.new_empty(0))
                 for n, x in zip(needs, (hidden, weight, bias)))


# ---- single model -----------------------------------------------------------------------------------
@torch.library.custom_op("fastpref::token_stats", mutates_args=())
def token_stats_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, backend: str,
                   temperature: float, softcap: Optional[float], entropy: bool,
                   log_sum_p2: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    M = hidden.shape[0]
    if M == 0:
        return _f32(0, hidden), _f32(0, hidden), _f32(0, hidden), _f32(0, hidden)
    logp, lse, ent, p2 = backends.by_name(backend).stats_forward(
        hidden, weight, bias, labels, LogitOptions(temperature, softcap), entropy, log_sum_p2)
    return logp, lse, _f32(_NONE, hidden) if ent is None else ent, _f32(_NONE, hidden) if p2 is None else p2


@token_stats_op.register_fake
def _(hidden, weight, bias, labels, backend, temperature, softcap, entropy, log_sum_p2):
    M = hidden.shape[0]
    return _f32(M, hidden), _f32(M, hidden), _f32(M if entropy else 0, hidden), _f32(M if log_sum_p2 else 0, hidden)


@torch.library.custom_op("fastpref::token_stats_backward", mutates_args=())
def token_stats_backward_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, lse: Tensor,
                            entropy: Tensor, grad_logp: Tensor, grad_lse: Tensor, grad_entropy: Tensor,
                            backend: str, temperature: float, softcap: Optional[float],
                            needs: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    inputs = (hidden, weight, bias)
    if hidden.shape[0] == 0:
        return _grads_out([torch.zeros_like(x) if (n and x is not None) else None for n, x in zip(needs, inputs)],
                          inputs)
    ent = _opt(entropy)
    grads = backends.stats_backward(
        backends.by_name(backend), hidden, weight, bias, labels, lse, ent, grad_logp, grad_lse,
        None if ent is None else grad_entropy, LogitOptions(temperature, softcap), tuple(needs))
    return _grads_out(grads, inputs)


@token_stats_backward_op.register_fake
def _(hidden, weight, bias, labels, lse, entropy, grad_logp, grad_lse, grad_entropy, backend, temperature, softcap,
      needs):
    return _zero_grads_fake(hidden, weight, bias, needs)


def _stats_setup(ctx, inputs, output):
    hidden, weight, bias, labels, backend, temperature, softcap, _ent, _p2 = inputs
    ctx.save_for_backward(hidden, weight, bias, labels, output[1], output[2])
    ctx.cfg = (backend, temperature, softcap)


def _stats_backward(ctx, grad_logp, grad_lse, grad_entropy, _grad_p2):
    hidden, weight, bias, labels, lse, ent = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:3]]
    if not any(needs):
        return None, None, None, None, None, None, None, None, None
    dh, dw, db = token_stats_backward_op(hidden, weight, bias, labels, lse, ent, grad_logp, grad_lse, grad_entropy,
                                         *ctx.cfg, needs)
    return (dh if needs[0] else None, dw if needs[1] else None, db if needs[2] and bias is not None else None,
            None, None, None, None, None, None)


token_stats_op.register_autograd(_stats_backward, setup_context=_stats_setup)


# ---- single model, frozen head (weight and bias need no gradient): fastpref._frozen ---------------------
@torch.library.custom_op("fastpref::token_stats_frozen", mutates_args=())
def token_stats_frozen_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, backend: str,
                          temperature: float, softcap: Optional[float], entropy: bool,
                          log_sum_p2: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """token_stats plus EA = E_p[(dz/dx)·W] and EC = E_p[(log p + H)·(dz/dx)·W] (float32 [M, D]; EC empty
    without entropy), from which the backward forms dL/dh without a pass over the vocabulary."""
    M = hidden.shape[0]
    if M == 0:
        return tuple(_f32(0, hidden) for _ in range(6))
    logp, lse, ent, p2, ea, ec = backends.by_name(backend).stats_forward_frozen(
        hidden, weight, bias, labels, LogitOptions(temperature, softcap), entropy, log_sum_p2)
    none = lambda t: _f32(_NONE, hidden) if t is None else t  # noqa: E731
    return logp, lse, none(ent), none(p2), ea, none(ec)


@token_stats_frozen_op.register_fake
def _(hidden, weight, bias, labels, backend, temperature, softcap, entropy, log_sum_p2):
    M, D = hidden.shape
    f = lambda *shape: hidden.new_empty(shape, dtype=torch.float32)  # noqa: E731
    return f(M), f(M), f(M if entropy else 0), f(M if log_sum_p2 else 0), f(M, D), f(M, D) if entropy else f(0)


def _frozen_setup(ctx, inputs, output):
    hidden, weight, bias, labels, backend, temperature, softcap, _ent, _p2 = inputs
    logp, lse, ent, _, ea, ec = output
    ctx.save_for_backward(weight, labels, logp, lse, ent, ea, ec)
    ctx.cfg = (hidden.dtype, LogitOptions(temperature, softcap))


def _frozen_backward(ctx, grad_logp, grad_lse, grad_entropy, _grad_p2, _grad_ea, _grad_ec):
    weight, labels, logp, lse, ent, ea, ec = ctx.saved_tensors
    dtype, opts = ctx.cfg
    if not ctx.needs_input_grad[0] or lse.numel() == 0:
        return (None,) * 9
    g_ent = None if _opt(ent) is None else grad_entropy.float()
    dh = _frozen.hidden_grad(weight, labels, logp, lse, ea, _opt(ec), grad_logp.float(), grad_lse.float(), g_ent,
                             opts)
    return (dh.to(dtype),) + (None,) * 8


token_stats_frozen_op.register_autograd(_frozen_backward, setup_context=_frozen_setup)


# ---- two models: KL ---------------------------------------------------------------------------------
@torch.library.custom_op("fastpref::token_kl", mutates_args=())
def token_kl_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ref_hidden: Tensor, ref_weight: Tensor,
                ref_bias: Optional[Tensor], labels: Optional[Tensor], backend: str, temperature: float,
                softcap: Optional[float], ref_softcap: Optional[float],
                direction: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(kl, logp, ref_logp, lse, ref_lse); logp/ref_logp empty without labels."""
    M = hidden.shape[0]
    if M == 0:
        return tuple(_f32(0, hidden) for _ in range(5))
    kl, lse, ref_lse, logp, ref_logp = backends.by_name(backend).kl_forward(
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, LogitOptions(temperature, softcap),
        LogitOptions(temperature, ref_softcap), direction)
    none = _f32(_NONE, hidden)
    return kl, none if logp is None else logp, none.clone() if ref_logp is None else ref_logp, lse, ref_lse


@token_kl_op.register_fake
def _(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, backend, temperature, softcap, ref_softcap,
      direction):
    M = hidden.shape[0]
    L = M if labels is not None else 0
    return _f32(M, hidden), _f32(L, hidden), _f32(L, hidden), _f32(M, hidden), _f32(M, hidden)


@torch.library.custom_op("fastpref::token_kl_backward", mutates_args=())
def token_kl_backward_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ref_hidden: Tensor,
                         ref_weight: Tensor, ref_bias: Optional[Tensor], labels: Optional[Tensor], lse: Tensor,
                         ref_lse: Tensor, kl: Tensor, grad_kl: Tensor, grad_logp: Tensor, backend: str,
                         temperature: float, softcap: Optional[float], ref_softcap: Optional[float], direction: str,
                         needs: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    inputs = (hidden, weight, bias)
    if hidden.shape[0] == 0:
        return _grads_out([torch.zeros_like(x) if (n and x is not None) else None for n, x in zip(needs, inputs)],
                          inputs)
    grads = backends.kl_backward(
        backends.by_name(backend), hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lse, ref_lse, kl,
        grad_kl, None if labels is None else grad_logp,
        LogitOptions(temperature, softcap), LogitOptions(temperature, ref_softcap), direction, tuple(needs))
    return _grads_out(grads, inputs)


@token_kl_backward_op.register_fake
def _(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lse, ref_lse, kl, grad_kl, grad_logp, backend,
      temperature, softcap, ref_softcap, direction, needs):
    return _zero_grads_fake(hidden, weight, bias, needs)


def _kl_setup(ctx, inputs, output):
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, backend, temperature, softcap, ref_softcap, \
        direction = inputs
    kl, _logp, _ref_logp, lse, ref_lse = output
    ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lse, ref_lse, kl)
    ctx.cfg = (backend, temperature, softcap, ref_softcap, direction)


def _kl_backward(ctx, grad_kl, grad_logp, _grad_ref_logp, _grad_lse, _grad_ref_lse):
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lse, ref_lse, kl = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:3]]
    if not any(needs):
        return (None,) * 12
    dh, dw, db = token_kl_backward_op(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lse, ref_lse,
                                      kl, grad_kl, grad_logp, *ctx.cfg, needs)
    return (dh if needs[0] else None, dw if needs[1] else None, db if needs[2] and bias is not None else None,
            *(None,) * 9)


token_kl_op.register_autograd(_kl_backward, setup_context=_kl_setup)
