"""Backend registry and dispatch.

A backend computes the fused ops on compact inputs: hidden [M, D] and weight [V, D]
contiguous and of one dtype, bias [V] or None, labels int64 [M] all inside [0, V)
(ignored rows are removed before a backend sees them). Every output is float32 [M].
See ``fastpref.backends.base.Backend`` for the methods.
"""
from __future__ import annotations

import os

import torch

from .base import Backend, BackendUnavailable

_NAMES = ("torch", "triton", "native")
# Batch-invariant variants (docs/batch-invariance.md): "<backend>+invariant", so far torch's and native's.
INVARIANT = "+invariant"
_INVARIANT_NAMES = ("torch" + INVARIANT, "native" + INVARIANT)


def _load(name: str) -> Backend:
    if name == "torch":
        from .torch_backend import TorchBackend

        return TorchBackend()
    if name == "triton":
        from .triton_backend import load

        return load()
    if name == "native":
        from .native_backend import load

        return load()
    if name == "torch" + INVARIANT:
        from .invariant import InvariantTorchBackend

        return InvariantTorchBackend()
    if name == "native" + INVARIANT:
        from .invariant import BlockedInvariant
        from .native_backend import load as load_native

        return BlockedInvariant(load_native())
    raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, _NAMES))}; got {name!r}")


_CACHE: dict[str, Backend | BackendUnavailable] = {}


def _try(name: str) -> Backend | BackendUnavailable:
    if name not in _CACHE:
        try:
            _CACHE[name] = _load(name)
        except BackendUnavailable as why:
            _CACHE[name] = why
    return _CACHE[name]


def available(device: torch.device | str | None = None) -> list[str]:
    """Names of the backends that can run (on ``device`` when given)."""
    out = []
    for name in _NAMES:
        b = _try(name)
        if isinstance(b, Backend) and (device is None or b.supports(torch.device(device)) is None):
            out.append(name)
    return out


def _check_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name != "auto" and name not in _NAMES and name not in _INVARIANT_NAMES:
        raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, _NAMES))}; got {name!r}")
    return name


def resolve(name: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend object for ``name`` ('auto' picks one) that runs on ``device`` with ``dtype``."""
    _check_name(name)
    if name == "auto":
        name = os.environ.get("FASTPREF_BACKEND", "auto") or "auto"
        if name == "auto":
            return _auto(device, dtype)
        _check_name(name)
    b = _try(name)
    if isinstance(b, BackendUnavailable):
        raise ValueError(f"backend {name!r} is not available: {b}. Available: {available()}")
    why = b.supports(device, dtype)
    if why is not None:
        raise ValueError(f"backend {name!r} cannot run here: {why}. Available on {device}: {available(device)}")
    return b


def _auto(device: torch.device, dtype: torch.dtype) -> Backend:
    order = ("triton", "torch") if device.type == "cuda" else ("native", "torch")
    for cand in order:
        b = _try(cand)
        if isinstance(b, Backend) and b.supports(device, dtype) is None:
            return b
    return resolve("torch", device, dtype)


def invariant_name(name: str) -> str:
    """The batch-invariant variant of backend ``name`` ("auto" means torch there; triton has none yet:
    ValueError)."""
    _check_name(name)
    if name in ("auto", "torch", "native"):
        return ("torch" if name == "auto" else name) + INVARIANT
    raise ValueError(f"backend {name!r} has no batch-invariant mode yet; use backend='torch' or 'auto' "
                     "(docs/batch-invariance.md)")


def name_for_op(name: str, device: torch.device, dtype: torch.dtype, invariant: bool = False) -> str:
    """The backend name a fused op is called with (its batch-invariant variant when ``invariant``).

    Eagerly: resolved now (a wrong or unavailable backend is reported before any work). Under torch.compile:
    only checked, and passed as given ("auto" included): loading a backend imports modules, which a traced
    region cannot do, so the op resolves the name when it runs, outside the graph (``resolve`` again).
    """
    if invariant:
        name = invariant_name(name)
    if torch.compiler.is_compiling():
        return _check_name(name)
    return resolve(name, device, dtype).name


def row_vector(x: torch.Tensor | None, rows: int, name: str) -> torch.Tensor | None:
    """None, or ``x`` as a contiguous float32 [rows] tensor: the only form a backend's backward accepts.

    Autograd hands out expanded upstream gradients (the gradient of ``out.sum()`` has stride 0) and other
    views; the Triton and CUDA kernels read ``G[row]`` from the storage directly, so such a gradient would
    be read past its end.
    """
    if x is None:
        return None
    if tuple(x.shape) != (rows,):
        raise ValueError(f"{name} must have shape [{rows}], got {tuple(x.shape)}")
    return x.to(torch.float32).contiguous()


def stats_backward(impl: Backend, hidden, weight, bias, labels, lse, entropy, grad_logp, grad_lse, grad_entropy,
                   opts, needs):
    """``impl.stats_backward`` with every per-row input made a contiguous float32 [M] tensor (``row_vector``):
    the one entry point of the backward for every caller."""
    M = hidden.shape[0]
    vec = [row_vector(x, M, n) for x, n in ((lse, "lse"), (entropy, "entropy"), (grad_logp, "grad_logp"),
                                            (grad_lse, "grad_lse"), (grad_entropy, "grad_entropy"))]
    return impl.stats_backward(hidden, weight, bias, labels, *vec, opts, needs)


def kl_backward(impl: Backend, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lse, ref_lse, kl,
                grad_kl, grad_logp, opts, ref_opts, direction, needs):
    """``impl.kl_backward`` with every per-row input made a contiguous float32 [M] tensor (``row_vector``)."""
    M = hidden.shape[0]
    vec = [row_vector(x, M, n) for x, n in ((lse, "lse"), (ref_lse, "ref_lse"), (kl, "kl"), (grad_kl, "grad_kl"),
                                            (grad_logp, "grad_logp"))]
    return impl.kl_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, *vec, opts, ref_opts,
                            direction, needs)


__all__ = ["Backend", "BackendUnavailable", "available", "invariant_name", "kl_backward", "name_for_op", "resolve",
           "row_vector", "stats_backward"]
