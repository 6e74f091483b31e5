"""The implementations the benchmarks compare, each behind one small factory.

A per-token log-prob implementation is ``f(hidden [M, D], weight [V, D], labels [M]) -> logp float32 [M]``
(every label valid). Factories raise ``Unavailable`` with a one-line reason where an implementation
cannot run (library not installed, needs a GPU, ...); the runner reports that reason instead of failing.
Reference libraries are imported lazily, so none of them is needed to run the fastpref rows.
"""
from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import fastpref

Tensor = torch.Tensor
LogprobFn = Callable[[Tensor, Tensor, Tensor], Tensor]


class Unavailable(RuntimeError):
    """This implementation cannot run here; the message says why (shown as a note)."""


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class LogprobImpl:
    key: str          # stable id used in filters, JSON and plots
    label: str        # what the tables show
    make: Callable[[torch.device, torch.dtype], LogprobFn]
    family: str       # "fastpref", "torch" or "reference"
    compiled: bool = False


# ------------------------------------------------------------------------------------------- plain torch
def plain_logprobs(h: Tensor, w: Tensor, y: Tensor) -> Tensor:
    """The naive path: materialized [M, V] logits, float32 log_softmax, gather."""
    logits = (h @ w.T).float()
    return torch.log_softmax(logits, -1).gather(1, y[:, None]).squeeze(1)


_COMPILED: dict[str, Callable] = {}


def compiled(fn: Callable, name: str) -> Callable:
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, dynamic=False)
    return _COMPILED[name]


def _torch(device, dtype):
    return plain_logprobs


def _torch_compile(device, dtype):
    return compiled(plain_logprobs, "plain_logprobs")


def _torch_lce(device, dtype):
    if not hasattr(F, "linear_cross_entropy"):
        raise Unavailable(f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy")
    return lambda h, w, y: -F.linear_cross_entropy(h, w, y, reduction="none").float()


def _torch_lce_chunked(device, dtype):
    try:
        from torch.nn import LinearCrossEntropyOptions
    except ImportError:
        raise Unavailable(f"torch {torch.__version__} has no LinearCrossEntropyOptions (chunked path)") from None
    opts = LinearCrossEntropyOptions()
    return lambda h, w, y: -F.linear_cross_entropy(h, w, y, reduction="none", options=opts).float()


# ------------------------------------------------------------------------------------------- fastpref
STRATEGY_ENV = "FASTPREF_TRITON_BACKWARD"  # the Triton backend's backward strategy (issue 15): atomic | gemm


def fastpref_variant(key: str) -> tuple[str, str | None]:
    """'fastpref[triton/gemm]' -> ('triton', 'gemm'); 'fastpref[native]' -> ('native', None)."""
    backend, _, strategy = key[len("fastpref["):-1].partition("/")
    return backend, strategy or None


def entry_environment(key: str) -> dict[str, str]:
    """Environment variables an implementation runs under (set for the whole measurement, backward included)."""
    if key.startswith("fastpref["):
        _backend, strategy = fastpref_variant(key)
        if strategy:
            return {STRATEGY_ENV: strategy}
    return {}


def triton_strategies() -> tuple[str, ...]:
    """The backward strategies this fastpref's Triton backend offers (``triton_backend.STRATEGIES``), () if none."""
    try:
        from fastpref.backends import triton_backend
    except ImportError:
        return ()
    return tuple(getattr(triton_backend, "STRATEGIES", ()))


def _fastpref(backend: str, strategy: str | None = None):
    def make(device, dtype):
        if backend == "triton" and device.type != "cuda":
            raise Unavailable("GPU backend (only the Triton interpreter runs on a CPU: not timed)")
        if backend not in fastpref.available_backends(device):
            raise Unavailable(f"backend {backend!r} not available on {device.type} "
                              f"(available: {fastpref.available_backends(device)})")
        if strategy and strategy not in triton_strategies():
            raise Unavailable(f"{STRATEGY_ENV}={strategy}: this fastpref's Triton backend does not offer it "
                              f"(offers: {', '.join(triton_strategies()) or 'no selectable strategy'})")
        return lambda h, w, y: fastpref.token_logprobs(h, w, y, backend=backend)
    return make


# ------------------------------------------------------------------------------------------- references
def _cce(device, dtype):
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError:
        raise Unavailable("cut-cross-entropy not installed (pip install -r requirements-bench.txt)") from None
    # The Triton "cce" kernels need a GPU (not even the interpreter runs them); on the CPU its compiled
    # torch reference (materialized logits under torch.compile) is what runs.
    impl = "cce" if device.type == "cuda" else "torch_compile"
    return lambda h, w, y: -linear_cross_entropy(h, w, y, reduction="none", impl=impl).float()


def _trl(device, dtype):
    try:
        try:
            from trl.kernels import ChunkedLogProbFunction as fn
        except ImportError:
            from trl.trainer.utils import _ChunkedLogProbFunction as fn
    except ImportError:
        raise Unavailable("trl not installed, or it has no chunked log-prob function") from None
    try:
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk
    except ImportError:
        chunk = 4096
    # positional: hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs
    return lambda h, w, y: fn.apply(h, w, None, y, 1.0, chunk, None, 1.0, ())[0].float()


def _liger_selective(device, dtype):
    try:
        from liger_kernel.chunked_loss import fused_linear_ppo as m
        fn = m._ChunkedSelectiveLogProbFunction
    except (ImportError, AttributeError):
        raise Unavailable("liger-kernel not installed, or it has no _ChunkedSelectiveLogProbFunction") from None
    chunk = getattr(m, "_SELECTIVE_LOGPROB_VOCAB_CHUNK_SIZE", 4096)
    return lambda h, w, y: fn.apply(h, w, y, None, 1.0, chunk).float()


def _liger_flce(device, dtype):
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        raise Unavailable("liger-kernel not installed") from None
    if device.type != "cuda":
        raise Unavailable("Liger's fused linear cross-entropy is a Triton kernel: GPU only")
    loss = LigerFusedLinearCrossEntropyLoss(reduction="none")
    def f(h, w, y):
        out = loss(w, h, y)
        return -(out[0] if isinstance(out, tuple) else getattr(out, "loss", out)).float()
    return f


def _gemm(device, dtype):
    raise Unavailable("the bare-GEMM baseline is a workload step of its own (workloads.gemm_step), not a function")


LOGPROB_IMPLS: list[LogprobImpl] = [
    LogprobImpl("fastpref[triton]", "fastpref (triton)", _fastpref("triton"), "fastpref"),
    LogprobImpl("fastpref[triton/atomic]", "fastpref (triton, atomic backward)", _fastpref("triton", "atomic"),
                "fastpref"),
    LogprobImpl("fastpref[triton/gemm]", "fastpref (triton, GEMM backward)", _fastpref("triton", "gemm"),
                "fastpref"),
    LogprobImpl("fastpref[native]", "fastpref (native)", _fastpref("native"), "fastpref"),
    LogprobImpl("fastpref[torch]", "fastpref (torch)", _fastpref("torch"), "fastpref"),
    LogprobImpl("torch", "torch, materialized logits", _torch, "torch"),
    LogprobImpl("torch.compile", "torch.compile, materialized logits", _torch_compile, "torch", compiled=True),
    LogprobImpl("torch.lce", "torch F.linear_cross_entropy", _torch_lce, "torch"),
    LogprobImpl("torch.lce-chunked", "torch F.linear_cross_entropy, chunked options", _torch_lce_chunked, "torch"),
    LogprobImpl("liger-flce", "Liger fused linear CE", _liger_flce, "reference"),
    LogprobImpl("cce", "Cut Cross-Entropy", _cce, "reference", compiled=True),
    LogprobImpl("trl-chunked", "TRL chunked log-prob", _trl, "reference"),
    LogprobImpl("liger-selective", "Liger chunked selective log-prob", _liger_selective, "reference"),
    LogprobImpl("gemm", "bare GEMMs (torch.mm, input dtype)", _gemm, "baseline"),
]
BY_KEY = {i.key: i for i in LOGPROB_IMPLS}
BASELINE = "torch"
GEMM = "gemm"   # the bare-GEMM baseline: the same N·D·V products, nothing else (workloads.gemm_step)
# The implementations of the CPU and the full GPU plans (the strategy variants and the GEMM rows are the
# GPU check's: bench/runner.py plan "check").
STANDARD = [i.key for i in LOGPROB_IMPLS if i.family != "baseline" and "/" not in i.key]


def liger_dpo(device, dtype, beta: float):
    """Liger's fused DPO loss with a reference model (batch-chunked, materializes per-pair logits)."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    except ImportError:
        raise Unavailable("liger-kernel not installed") from None
    # compiled=False on the CPU avoids a ~25 s inductor warm-up per shape; on GPUs Liger's default (compiled).
    return LigerFusedLinearDPOLoss(beta=beta, compiled=device.type == "cuda", use_ref_model=True)


LIBRARY_VERSIONS = {"liger-kernel": "liger_kernel", "cut-cross-entropy": "cut_cross_entropy", "trl": "trl"}


def library_versions() -> dict[str, str | None]:
    return {dist: version(dist) for dist in LIBRARY_VERSIONS}
