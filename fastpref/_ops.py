"""The fused ops as torch custom ops: opaque to torch.compile, with fake (shape) functions and autograd.

Backends are named by string: the public functions resolve it eagerly; under torch.compile they pass it as
given ("auto" included) and the op resolves it when it runs, outside the graph (see ``backends.resolve``).
Options travel as plain scalars. Outputs a caller did not ask for are empty [0] tensors (custom ops cannot
return None).

Eagerly, on plain tensors, :func:`fused_stats` and :func:`fused_kl` call the same implementations through an
autograd.Function instead of torch's custom-op dispatcher: that dispatcher wraps every kernel in
``torch._disable_dynamo``, which imports ``torch._dynamo`` (about a second) on the first call of a process.
Under torch.compile, any other tracing (a dispatch mode is active) or tensor subclasses, the custom ops run.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import _frozen, backends
from ._checks import PLAIN_TENSORS
from .options import LogitOptions

_NONE = 0  # placeholder length of an absent output


def _f32(shape: int | tuple[int, ...], like: Tensor) -> Tensor:
    return like.new_empty(shape, dtype=torch.float32)


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    """``t``, or a fresh empty float32 tensor standing for an absent output."""
    return _f32(_NONE, like) if t is None else t


def _opt(t: Tensor | None) -> Tensor | None:
    """Empty tensors stand for "absent"."""
    return None if t is None or t.numel() == 0 else t


def _grads_out(grads, inputs) -> tuple[Tensor, Tensor, Tensor]:
    """Backend gradients (None where not needed) → tensors in the input dtypes, empty where absent."""
    like = inputs[0]
    return tuple(like.new_empty(0) if (g is None or x is None) else g.to(x.dtype) for g, x in zip(grads, inputs))


def _direct(*tensors: Tensor | None) -> bool:
    """True when the implementation can be called directly: eager, no dispatch mode, plain tensors only."""
    return (not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None
            and all(t is None or type(t) in PLAIN_TENSORS for t in tensors))


def _eager_function(name: str, impl, setup_context, backward) -> type[torch.autograd.Function]:
    """An autograd.Function running ``impl`` with the custom op's own setup_context and backward."""
    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(impl), "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward)})


def _zero_grads(inputs: tuple, needs: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """The backward of zero rows: zero gradients for the needed (hidden, weight, bias), empty elsewhere."""
    return _grads_out([torch.zeros_like(x) if (n and x is not None) else None for n, x in zip(needs, inputs)],
                      inputs)


def _zero_grads_fake(hidden, weight, bias, needs):
    return tuple(torch.empty_like(x) if (n and x is not None) else (hidden.new_empty(0))
                 for n, x in zip(needs, (hidden, weight, bias)))


# ---- single model -----------------------------------------------------------------------------------
def _stats_impl(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, backend: str,
                temperature: float, softcap: Optional[float], entropy: bool,
                log_sum_p2: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    M = hidden.shape[0]
    if M == 0:
        return _f32(0, hidden), _f32(0, hidden), _f32(0, hidden), _f32(0, hidden)
    logp, lse, ent, p2 = backends.resolve(backend, hidden.device, hidden.dtype).stats_forward(
        hidden, weight, bias, labels, LogitOptions(temperature, softcap), entropy, log_sum_p2)
    return logp, lse, _or_empty(ent, hidden), _or_empty(p2, hidden)


token_stats_op = torch.library.custom_op("fastpref::token_stats", mutates_args=())(_stats_impl)


@token_stats_op.register_fake
def _(hidden, weight, bias, labels, backend, temperature, softcap, entropy, log_sum_p2):
    M = hidden.shape[0]
    return _f32(M, hidden), _f32(M, hidden), _f32(M if entropy else 0, hidden), _f32(M if log_sum_p2 else 0, hidden)


def _stats_backward_impl(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, lse: Tensor,
                         entropy: Tensor, grad_logp: Tensor, grad_lse: Tensor, grad_entropy: Tensor,
                         backend: str, temperature: float, softcap: Optional[float],
                         needs: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    inputs = (hidden, weight, bias)
    if hidden.shape[0] == 0:
        return _zero_grads(inputs, needs)
    ent = _opt(entropy)
    impl = backends.resolve(backend, hidden.device, hidden.dtype)
    grads = backends.stats_backward(
        impl, hidden, weight, bias, labels, lse, ent, grad_logp, grad_lse, None if ent is None else grad_entropy,
        LogitOptions(temperature, softcap), tuple(needs))
    return _grads_out(grads, inputs)


token_stats_backward_op = torch.library.custom_op("fastpref::token_stats_backward", mutates_args=())(
    _stats_backward_impl)


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
    args = (hidden, weight, bias, labels, lse, ent, grad_logp, grad_lse, grad_entropy, *ctx.cfg, needs)
    dh, dw, db = (_stats_backward_impl if _direct(*args[:9]) else token_stats_backward_op)(*args)
    return (dh if needs[0] else None, dw if needs[1] else None, db if needs[2] and bias is not None else None,
            None, None, None, None, None, None)


token_stats_op.register_autograd(_stats_backward, setup_context=_stats_setup)
_EagerStats = _eager_function("_EagerStats", _stats_impl, _stats_setup, _stats_backward)


def fused_stats(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, backend: str,
                temperature: float, softcap: float | None, entropy: bool,
                log_sum_p2: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The fused stats op (arguments as ``token_stats_op``): directly when eager, else the custom op."""
    args = (hidden, weight, bias, labels, backend, temperature, softcap, entropy, log_sum_p2)
    return _EagerStats.apply(*args) if _direct(hidden, weight, bias, labels) else token_stats_op(*args)


# ---- single model, frozen head (weight and bias need no gradient): fastpref._frozen ---------------------
def _frozen_impl(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, backend: str,
                 temperature: float, softcap: Optional[float], entropy: bool,
                 log_sum_p2: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """token_stats plus EA = E_p[(dz/dx)·W] and EC = E_p[(log p + H)·(dz/dx)·W] (float32 [M, D]; EC empty
    without entropy), from which the backward forms dL/dh without a pass over the vocabulary."""
    M = hidden.shape[0]
    if M == 0:
        return tuple(_f32(0, hidden) for _ in range(6))
    logp, lse, ent, p2, ea, ec = backends.resolve(backend, hidden.device, hidden.dtype).stats_forward_frozen(
        hidden, weight, bias, labels, LogitOptions(temperature, softcap), entropy, log_sum_p2)
    return logp, lse, _or_empty(ent, hidden), _or_empty(p2, hidden), ea, _or_empty(ec, hidden)


token_stats_frozen_op = torch.library.custom_op("fastpref::token_stats_frozen", mutates_args=())(_frozen_impl)


@token_stats_frozen_op.register_fake
def _(hidden, weight, bias, labels, backend, temperature, softcap, entropy, log_sum_p2):
    M, D = hidden.shape
    return (_f32(M, hidden), _f32(M, hidden), _f32(M if entropy else 0, hidden), _f32(M if log_sum_p2 else 0, hidden),
            _f32((M, D), hidden), _f32((M, D) if entropy else 0, hidden))


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
_EagerFrozen = _eager_function("_EagerFrozen", _frozen_impl, _frozen_setup, _frozen_backward)


def fused_stats_frozen(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, backend: str,
                       temperature: float, softcap: float | None, entropy: bool,
                       log_sum_p2: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The frozen-head stats op (arguments as ``token_stats_frozen_op``): directly when eager, else the op."""
    args = (hidden, weight, bias, labels, backend, temperature, softcap, entropy, log_sum_p2)
    return _EagerFrozen.apply(*args) if _direct(hidden, weight, bias, labels) else token_stats_frozen_op(*args)


# ---- two models: KL ---------------------------------------------------------------------------------
def _kl_impl(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ref_hidden: Tensor, ref_weight: Tensor,
             ref_bias: Optional[Tensor], labels: Optional[Tensor], backend: str, temperature: float,
             softcap: Optional[float], ref_softcap: Optional[float],
             direction: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(kl, logp, ref_logp, lse, ref_lse); logp/ref_logp empty without labels."""
    M = hidden.shape[0]
    if M == 0:
        return tuple(_f32(0, hidden) for _ in range(5))
    kl, lse, ref_lse, logp, ref_logp = backends.resolve(backend, hidden.device, hidden.dtype).kl_forward(
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, LogitOptions(temperature, softcap),
        LogitOptions(temperature, ref_softcap), direction)
    return kl, _or_empty(logp, hidden), _or_empty(ref_logp, hidden), lse, ref_lse


token_kl_op = torch.library.custom_op("fastpref::token_kl", mutates_args=())(_kl_impl)


@token_kl_op.register_fake
def _(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, backend, temperature, softcap, ref_softcap,
      direction):
    M = hidden.shape[0]
    L = M if labels is not None else 0
    return _f32(M, hidden), _f32(L, hidden), _f32(L, hidden), _f32(M, hidden), _f32(M, hidden)


def _kl_backward_impl(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ref_hidden: Tensor,
                      ref_weight: Tensor, ref_bias: Optional[Tensor], labels: Optional[Tensor], lse: Tensor,
                      ref_lse: Tensor, kl: Tensor, grad_kl: Tensor, grad_logp: Tensor, backend: str,
                      temperature: float, softcap: Optional[float], ref_softcap: Optional[float], direction: str,
                      needs: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    inputs = (hidden, weight, bias)
    if hidden.shape[0] == 0:
        return _zero_grads(inputs, needs)
    impl = backends.resolve(backend, hidden.device, hidden.dtype)
    grads = backends.kl_backward(
        impl, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lse, ref_lse, kl,
        grad_kl, None if labels is None else grad_logp,
        LogitOptions(temperature, softcap), LogitOptions(temperature, ref_softcap), direction, tuple(needs))
    return _grads_out(grads, inputs)


token_kl_backward_op = torch.library.custom_op("fastpref::token_kl_backward", mutates_args=())(_kl_backward_impl)


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
    args = (hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lse, ref_lse, kl, grad_kl, grad_logp,
            *ctx.cfg, needs)
    dh, dw, db = (_kl_backward_impl if _direct(*args[:12]) else token_kl_backward_op)(*args)
    return (dh if needs[0] else None, dw if needs[1] else None, db if needs[2] and bias is not None else None,
            *(None,) * 9)


token_kl_op.register_autograd(_kl_backward, setup_context=_kl_setup)
_EagerKL = _eager_function("_EagerKL", _kl_impl, _kl_setup, _kl_backward)


def fused_kl(hidden: Tensor, weight: Tensor, bias: Tensor | None, ref_hidden: Tensor, ref_weight: Tensor,
             ref_bias: Tensor | None, labels: Tensor | None, backend: str, temperature: float,
             softcap: float | None, ref_softcap: float | None,
             direction: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The fused KL op (arguments as ``token_kl_op``): directly when eager, else the custom op."""
    args = (hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, backend, temperature, softcap,
            ref_softcap, direction)
    return _EagerKL.apply(*args) if _direct(*args[:7]) else token_kl_op(*args)


# ---- two models, frozen policy head (its weight and bias need no gradient): fastpref._frozen -------------
def _kl_frozen_impl(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ref_hidden: Tensor,
                    ref_weight: Tensor, ref_bias: Optional[Tensor], labels: Optional[Tensor], backend: str,
                    temperature: float, softcap: Optional[float], ref_softcap: Optional[float],
                    direction: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """token_kl's outputs plus dKL = ∂KL/∂hidden and (with labels, else empty) EA = E_p[(dz/dx)·W], float32
    [M, D], from which the backward forms dL/dh without a pass over the vocabulary."""
    M = hidden.shape[0]
    if M == 0:
        return tuple(_f32(0, hidden) for _ in range(7))
    kl, lse, ref_lse, logp, ref_logp, dkl, ea = backends.resolve(
        backend, hidden.device, hidden.dtype).kl_forward_frozen(
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, LogitOptions(temperature, softcap),
        LogitOptions(temperature, ref_softcap), direction)
    return kl, _or_empty(logp, hidden), _or_empty(ref_logp, hidden), lse, ref_lse, dkl, _or_empty(ea, hidden)


token_kl_frozen_op = torch.library.custom_op("fastpref::token_kl_frozen", mutates_args=())(_kl_frozen_impl)


@token_kl_frozen_op.register_fake
def _(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, backend, temperature, softcap, ref_softcap,
      direction):
    M, D = hidden.shape
    L = M if labels is not None else 0
    return (_f32(M, hidden), _f32(L, hidden), _f32(L, hidden), _f32(M, hidden), _f32(M, hidden),
            _f32((M, D), hidden), _f32((L, D), hidden))


def _kl_frozen_setup(ctx, inputs, output):
    _h, weight, _b, _rh, _rw, _rb, labels, _backend, temperature, softcap, _rs, _direction = inputs
    _kl, logp, _ref_logp, lse, _ref_lse, dkl, ea = output
    ctx.save_for_backward(weight, labels, logp, lse, dkl, ea)
    ctx.cfg = (inputs[0].dtype, LogitOptions(temperature, softcap))


def _kl_frozen_backward(ctx, grad_kl, grad_logp, *_others):
    weight, labels, logp, lse, dkl, ea = ctx.saved_tensors
    dtype, opts = ctx.cfg
    if not ctx.needs_input_grad[0] or lse.numel() == 0:
        return (None,) * 12
    g_logp = None if labels is None else grad_logp.float()
    dh = _frozen.kl_hidden_grad(weight, labels, _opt(logp), lse, dkl, _opt(ea), grad_kl.float(), g_logp, opts)
    return (dh.to(dtype),) + (None,) * 11


token_kl_frozen_op.register_autograd(_kl_frozen_backward, setup_context=_kl_frozen_setup)
_EagerKLFrozen = _eager_function("_EagerKLFrozen", _kl_frozen_impl, _kl_frozen_setup, _kl_frozen_backward)


def fused_kl_frozen(hidden: Tensor, weight: Tensor, bias: Tensor | None, ref_hidden: Tensor, ref_weight: Tensor,
                    ref_bias: Tensor | None, labels: Tensor | None, backend: str, temperature: float,
                    softcap: float | None, ref_softcap: float | None,
                    direction: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The frozen-policy-head KL op (arguments as ``token_kl_frozen_op``): directly when eager, else the op."""
    args = (hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, backend, temperature, softcap,
            ref_softcap, direction)
    return _EagerKLFrozen.apply(*args) if _direct(*args[:7]) else token_kl_frozen_op(*args)
