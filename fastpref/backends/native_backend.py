"""C++ (CPU) and CUDA kernels from csrc/, behind the backend interface.

The compiled modules are ``fastpref._native_cpu`` (built by setup.py whenever a C++ compiler is present)
and ``fastpref._native_cuda`` (built when torch has CUDA and nvcc is found). Both run one algorithm:
vocabulary chunks × row blocks, a float32 GEMM per logits tile through ATen, then a fused per-row pass
(online log-sum-exp, entropy, log Σp², KL accumulators, label logits); the backward recomputes each tile,
forms dL/dlogits in place and runs the two GEMMs for dH and dW. Semantics match the torch backend.
With a frozen head (weight and bias need no gradient) both modules' forwards also accumulate the float32
[N, D] expectations of fastpref._frozen (``stats_forward_frozen``; ``kl_forward_frozen`` for token_kl), one
extra GEMM per tile and accumulator, so that the backward needs no pass over the vocabulary.

Scratch memory (float32 elements, CPU), with T threads and tiles of R rows × C vocabulary entries:
``T · (2·R·C + R·(D + D_ref + D_kl) + C·(2·D + D_ref) + 3·C)`` with D_ref = 0 for token_stats and D_kl = D for
token_kl, else 0 (R = 1024, C = 2048 by default: a bound of 34 MiB per thread for token_kl at D = D_ref = 512;
float32 token_stats allocates only its 8 MiB tile and a 4 MiB dW partial), independent of V and N. The
frozen-head forwards reuse the logits tiles as weights tiles (token_kl's without labels adds its R·D
accumulator, the D_kl term) and return their float32 [N, D] expectations as outputs; the backward adds a
float32 [N, D] dH accumulator and the gradients themselves (dW in the weight's dtype).
``scratch_bound_bytes()`` / ``last_scratch_bytes()`` of the CPU module evaluate the bound and report what
the last call allocated.

Dtypes: float32, float16 and bfloat16; accumulation is always float32. On the CPU, half blocks are upcast
to float32 scratch before each GEMM. On CUDA (torch >= 2.9), a half hidden and weight of one dtype go to
cuBLAS as they are (tensor cores, float32 output), and the backward rounds dL/dlogits to that dtype for the
dH/dW products, as the Triton backend does; mixed dtypes (e.g. a float32 master weight) are upcast. float64 is rejected by ``supports()`` (use backend="torch"); a float64
reference model in token_kl is read through float32 copies, as the torch backend does.
"""
from __future__ import annotations

import importlib
import json
import os

import torch

from .base import BackendUnavailable

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_STATUS_FILE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "_native_build.json")


def _build_notes() -> dict:
    """Reasons setup.py recorded for extensions it could not build (missing when all were built)."""
    try:
        with open(_STATUS_FILE) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _import(module: str, kind: str):
    """(module, None) or (None, why)."""
    try:
        return importlib.import_module(f"fastpref.{module}"), None
    except ImportError as err:
        note = _build_notes().get(module)
        if note:
            return None, f"the {kind} extension was not built: {note}"
        return None, (f"the {kind} extension fastpref.{module} cannot be imported ({err}); "
                      "build it with `pip install --no-build-isolation -e .`")


def _cap(softcap):
    return 0.0 if softcap is None else float(softcap)


def cuda_device_reason(capability: tuple[int, int], image_error: str) -> str | None:
    """Why the CUDA extension cannot run on a GPU of this compute capability, given its kernel-image probe
    (``kernel_image_error``: '' when the device can run the build's machine code or JIT its PTX)."""
    if not image_error:
        return None
    major, minor = capability
    return (f"the native CUDA extension has no kernel this GPU (sm_{major}{minor}) can run ({image_error}); "
            "rebuild it on this machine (`pip install --no-build-isolation -e .`, TORCH_CUDA_ARCH_LIST naming "
            "this GPU) or use backend='triton'")


def _d(*xs):
    """Detached tensors (None stays None): the extensions call ATen out= ops, which refuse autograd inputs."""
    return tuple(None if x is None else x.detach() for x in xs)


class NativeBackend:
    name = "native"

    def __init__(self, cpu, cpu_why, cuda, cuda_why):
        self.cpu, self.cpu_why, self.cuda, self.cuda_why = cpu, cpu_why, cuda, cuda_why
        self._device_why: dict[int, str | None] = {}  # CUDA device index → cuda_device_reason, probed once

    def _cuda_device_why(self, device: torch.device) -> str | None:
        """Whether the extension's kernels load on this GPU: an extension built without this GPU's
        architecture (and without PTX it can compile) imports fine and then fails at every launch."""
        index = torch.cuda.current_device() if device.index is None else device.index
        if index not in self._device_why:
            self._device_why[index] = cuda_device_reason(torch.cuda.get_device_capability(index),
                                                         self.cuda.kernel_image_error(index))
        return self._device_why[index]

    def supports(self, device: torch.device, dtype: torch.dtype | None = None) -> str | None:
        device = torch.device(device)
        if device.type == "cpu":
            if self.cpu is None:
                return self.cpu_why
        elif device.type == "cuda":
            if self.cuda is None:
                return self.cuda_why
            why = self._cuda_device_why(device)
            if why is not None:
                return why
        else:
            return f"the native backend runs on CPU and CUDA tensors, not on {device.type}"
        if dtype is not None and dtype not in _DTYPES:
            return (f"the native backend computes in float32 and takes float32/float16/bfloat16 inputs, "
                    f"not {dtype}; use backend='torch'")
        return None

    def _mod(self, x: torch.Tensor):
        mod = self.cuda if x.is_cuda else self.cpu
        if mod is None:
            raise RuntimeError(self.cuda_why if x.is_cuda else self.cpu_why)
        return mod

    def _frozen_fn(self, x: torch.Tensor, name: str):
        """The module's frozen-head forward ``name``; an extension built before frozen heads lacks it."""
        fn = getattr(self._mod(x), name, None)
        if fn is None:
            raise RuntimeError(f"the native {'CUDA' if x.is_cuda else 'CPU'} extension was built before frozen "
                               f"heads were supported (it has no {name}); rebuild it with "
                               "`pip install --no-build-isolation -e .`")
        return fn

    # ---- token_stats ----------------------------------------------------------------------------
    def stats_forward(self, hidden, weight, bias, labels, opts, entropy, log_sum_p2):
        logp, lse, ent, p2 = self._mod(hidden).stats_forward(
            *_d(hidden, weight, bias, labels), float(opts.temperature), _cap(opts.softcap), entropy, log_sum_p2)
        return logp, lse, ent, p2

    def stats_forward_frozen(self, hidden, weight, bias, labels, opts, entropy, log_sum_p2):
        logp, lse, ent, p2, ea, ec = self._frozen_fn(hidden, "stats_forward_frozen")(
            *_d(hidden, weight, bias, labels), float(opts.temperature), _cap(opts.softcap), entropy, log_sum_p2)
        return logp, lse, ent if entropy else None, p2 if log_sum_p2 else None, ea, ec if entropy else None

    def stats_backward(self, hidden, weight, bias, labels, lse, entropy, grad_logp, grad_lse, grad_entropy,
                       opts, needs):
        dh, dw, db = self._mod(hidden).stats_backward(
            *_d(hidden, weight, bias, labels, lse, entropy, grad_logp, grad_lse, grad_entropy),
            float(opts.temperature), _cap(opts.softcap), bool(needs[0]), bool(needs[1]), bool(needs[2]))
        return dh, dw, db

    # ---- token_kl -------------------------------------------------------------------------------
    def kl_forward(self, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, opts, ref_opts,
                   direction):
        kl, lse, ref_lse, logp, ref_logp = self._mod(hidden).kl_forward(
            *_d(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels), float(opts.temperature),
            _cap(opts.softcap), _cap(ref_opts.softcap), direction == "reverse")
        return kl, lse, ref_lse, logp, ref_logp

    def kl_forward_frozen(self, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, opts, ref_opts,
                          direction):
        """kl_forward plus, for a frozen policy head (fastpref._frozen.kl_hidden_grad), float32 [M, D]
        dkl = ∂KL/∂h and ea = E_p[(dz/dx)·W] (None without labels)."""
        kl, lse, ref_lse, logp, ref_logp, dkl, ea = self._frozen_fn(hidden, "kl_forward_frozen")(
            *_d(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels), float(opts.temperature),
            _cap(opts.softcap), _cap(ref_opts.softcap), direction == "reverse")
        return kl, lse, ref_lse, logp, ref_logp, dkl, ea

    def kl_backward(self, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lse, ref_lse, kl,
                    grad_kl, grad_logp, opts, ref_opts, direction, needs):
        dh, dw, db = self._mod(hidden).kl_backward(
            *_d(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lse, ref_lse, kl, grad_kl,
                grad_logp), float(opts.temperature), _cap(opts.softcap), _cap(ref_opts.softcap),
            direction == "reverse", bool(needs[0]), bool(needs[1]), bool(needs[2]))
        return dh, dw, db


def load() -> NativeBackend:
    cpu, cpu_why = _import("_native_cpu", "CPU")
    cuda, cuda_why = _import("_native_cuda", "CUDA")
    if cpu is None and cuda is None:
        raise BackendUnavailable(f"{cpu_why}; {cuda_why}")
    return NativeBackend(cpu, cpu_why, cuda, cuda_why)
