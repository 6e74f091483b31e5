"""Fused Triton kernels (kernels/, installed as fastpref.kernels), behind the backend interface.

Forward: one streaming pass over the vocabulary per row block (optionally split over the vocabulary and
merged by a tiny torch reduction). Backward, two strategies (docs/gpu-strategies.md), chosen by the
``backward`` attribute or the environment variable FASTPREF_TRITON_BACKWARD:
- "gemm" (default: what the arithmetic favours, not yet measured on a GPU): a kernel writes dL/dx of a bounded
  block of rows × vocabulary into scratch, then cuBLAS GEMMs with float32 accumulation form dH, dW, db.
  Deterministic; scratch ≤ max(256 MiB, 1% of the naive logits) (``kernels/gemm_backward.py``).
- "atomic": one program per (row block, vocabulary block) recomputing the logits tile and scattering
  float32 atomics into dH, dW, db. No scratch; not deterministic (refused under
  torch.use_deterministic_algorithms(True)).
Frozen heads (weight and bias need no gradient): ``stats_forward_frozen`` runs per block of rows × vocabulary
chunk the logits GEMM, one epilogue kernel (``kernels/stats_frozen.py``) and the GEMM(s) accumulating
E_p[(dz/dx)·W] (``kernels/frozen_forward.py``): 2 GEMMs in all (3 with entropy) and no backward vocabulary pass;
``kl_forward_frozen`` (a frozen policy head in token_kl) the same with two products and ``kernels/kl_frozen.py``:
2 GEMMs per model.
No [N, V] tensor is ever formed.
Runs on CUDA (fp16/bf16/fp32, sm_80+) and, for tests, on CPU tensors under TRITON_INTERPRET=1 (fp32/fp16).
"""
from __future__ import annotations

import math
import os
import warnings

import torch

from .base import BackendUnavailable


def _scalars(opts) -> dict:
    """The logit transform as kernel scalars: z = x/T, or tanh(x/cap)·(cap/T) with a softcap."""
    cap = opts.softcap
    return dict(inv_temp=1.0 / opts.temperature, inv_cap=0.0 if cap is None else 1.0 / cap,
                cap_scale=0.0 if cap is None else cap / opts.temperature)


STRATEGIES = ("gemm", "atomic")
STRATEGY_ENV = "FASTPREF_TRITON_BACKWARD"
_STAGE1 = {"stats_backward": "stats_dlogits", "kl_backward": "kl_dlogits"}


def backward_strategy(choice: str | None = None) -> str:
    """The backward strategy: ``choice``, else $FASTPREF_TRITON_BACKWARD, else "gemm".

    Under torch.use_deterministic_algorithms(True), "atomic" raises (or warns in warn_only mode)."""
    name = choice or os.environ.get(STRATEGY_ENV) or "gemm"
    if name not in STRATEGIES:
        raise ValueError(f"the Triton backward strategy must be one of {STRATEGIES} "
                         f"(argument or {STRATEGY_ENV}); got {name!r}")
    if name == "atomic" and torch.are_deterministic_algorithms_enabled():
        msg = ("the Triton backend's 'atomic' backward adds float32 atomics in a varying order and is not "
               f"deterministic; with torch.use_deterministic_algorithms(True) use the 'gemm' strategy "
               f"({STRATEGY_ENV}=gemm, the default)")
        if not torch.is_deterministic_algorithms_warn_only_enabled():
            raise RuntimeError(msg)
        warnings.warn(msg, stacklevel=3)
    return name


FILTER_ENV = "FASTPREF_GRAD_FILTER"


def grad_filter_eps(choice: float | str | None, dtype: torch.dtype) -> float:
    """Gradient-filter threshold (Cut Cross-Entropy style): 0.0 = off (the default, exact results).

    ``choice`` (else $FASTPREF_GRAD_FILTER): None/"" /"off" = off; "auto" = finfo(dtype).eps / 32 (2^-12 for
    bfloat16); a number = that threshold on |dL/dx|."""
    if choice is None:
        choice = os.environ.get(FILTER_ENV) or None
    if choice is None or choice == "off":
        return 0.0
    if choice == "auto":
        return torch.finfo(dtype).eps / 32
    try:
        eps = float(choice)
    except (TypeError, ValueError):
        eps = -1.0
    if not eps >= 0.0:
        raise ValueError(f"the gradient filter ({FILTER_ENV} or grad_filter) must be 'off', 'auto' or a number "
                         f">= 0; got {choice!r}")
    return eps


def _finish_stats(m, s, t, s2, z_label, entropy, log_sum_p2):
    """(logp, lse, entropy or None, log Σp² or None), float32 [M], from the online sums over the whole vocabulary:
    running max m, s = Σe^{z−m}, t = Σe^{z−m}(z−m), s2 = Σe^{2(z−m)} and the label's logit."""
    log_s = torch.log(s)
    lse = m + log_s
    ent = log_s - t / s if entropy else None
    p2 = torch.log(s2) - 2.0 * log_s if log_sum_p2 else None
    return z_label - lse, lse, ent, p2


def _as_dtype(dtype, *tensors):
    """The reference model's tensors in the policy's dtype (one dtype per kernel launch); None stays None."""
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def _bias(weight, bias):
    """The kernels always add a bias; a zero vector stands in for none."""
    return torch.zeros(weight.shape[0], device=weight.device, dtype=weight.dtype) if bias is None else bias


class TritonBackend:
    name = "triton"

    def __init__(self, launch_mod):
        self._k = launch_mod
        self.splits: int | None = None  # forces the forward's vocabulary splits (tests); None = heuristic
        self.backward: str | None = None  # "gemm" | "atomic"; None = $FASTPREF_TRITON_BACKWARD or "gemm"
        self.scratch_floor: int | None = None  # bytes; None = gemm_backward.SCRATCH_FLOOR (256 MiB)
        self.last_scratch_bytes = 0  # scratch the last "gemm" backward or frozen forward allocated (tests)
        self.grad_filter: float | str | None = None  # None = $FASTPREF_GRAD_FILTER, else off ("atomic" only)

    def supports(self, device: torch.device, dtype: torch.dtype | None = None) -> str | None:
        device = torch.device(device)
        if device.type == "cuda":
            if os.environ.get("TRITON_INTERPRET") == "1":
                return "TRITON_INTERPRET=1 runs Triton on CPU tensors only"
            if dtype is not None and dtype not in (torch.float16, torch.bfloat16, torch.float32):
                return f"dtype {dtype} is not supported (float16, bfloat16, float32)"
            major, _ = torch.cuda.get_device_capability(device)
            if major < 8:
                return "the Triton kernels need compute capability 8.0 or newer"
            return None
        if device.type == "cpu":
            if os.environ.get("TRITON_INTERPRET") != "1":
                return "CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)"
            if dtype == torch.bfloat16:
                return "the Triton interpreter cannot do bfloat16 arithmetic"
            if dtype is not None and dtype not in (torch.float16, torch.float32):
                return f"dtype {dtype} is not supported by the interpreter (float16, float32)"
            return None
        return f"device type {device.type!r} is not supported"

    # ---- shared glue -----------------------------------------------------------------------------
    def _forward(self, kernel, n_parts, hidden, weight, labels, flags, n_parts64=0, **args):
        """Launch a forward kernel; its per-split partials [n_parts, S, M] (float32) and [n_parts64, S, M] (float64)."""
        M, V = hidden.shape[0], weight.shape[0]
        dev, dt = hidden.device, hidden.dtype
        n_rows, splits, per = self._k.vocab_splits(M, V, dev, dt, kernel, self.splits)
        part = torch.empty((n_parts, splits, M), device=dev, dtype=torch.float32)
        part64 = torch.empty((n_parts64, splits, M), device=dev, dtype=torch.float64) if n_parts64 else None
        extra = dict(Part64=part64) if n_parts64 else {}
        self._k.launch(kernel, lambda cfg: (n_rows * splits,), dt, dev, flags, H=hidden, W=weight, Labels=labels,
                       Part=part, M=M, V=V, D=hidden.shape[1], n_splits=splits, tiles_per_split=per, **extra, **args)
        return part, part64

    def _backward(self, kernel, hidden, weight, bias, needs, flags, **args):
        M, V, D = hidden.shape[0], weight.shape[0], hidden.shape[1]
        f32 = dict(device=hidden.device, dtype=torch.float32)
        need_db = bool(needs[2] and bias is not None)
        strategy = backward_strategy(self.backward)
        dh = torch.zeros((M, D), **f32) if needs[0] else None
        # "gemm" writes dW chunk by chunk in the weight's dtype (float32 accumulation inside each chunk, within
        # the scratch budget); "atomic" scatters float32 atomics into a float32 [V, D].
        dw = None if not needs[1] else torch.empty_like(weight) if strategy == "gemm" else torch.zeros((V, D), **f32)
        db = torch.zeros((V,), **f32) if need_db else None
        eps = grad_filter_eps(self.grad_filter, hidden.dtype)
        if eps > 0 and strategy != "atomic":
            raise ValueError("gradient filtering skips tiles of the 'atomic' backward; set "
                             f"{STRATEGY_ENV}=atomic to use it (the 'gemm' strategy has no per-tile products)")
        if strategy == "gemm":
            self._gemm_backward(_STAGE1[kernel], hidden, weight, dh, dw, db, flags, args)
            return dh, dw, db
        dummy = torch.empty((1,), **f32)

        def grid(cfg):
            return (-(-M // cfg.BN) * -(-V // cfg.BV),)

        self._k.launch(kernel, grid, hidden.dtype, hidden.device, flags, H=hidden, W=weight,
                       dH=dummy if dh is None else dh, dW=dummy if dw is None else dw,
                       dB=dummy if db is None else db, M=M, V=V, D=D,
                       need_dh=int(dh is not None), need_dw=int(dw is not None), need_db=int(need_db),
                       filter_eps=eps, **args)
        return dh, dw, db

    def _gemm_backward(self, kernel, hidden, weight, dh, dw, db, flags, args):
        """Strategy "gemm": ``kernel`` writes dL/dx blocks into scratch; GEMMs accumulate dh, dw, db in place."""
        from fastpref.kernels import gemm_backward, presets

        M, V, D = hidden.shape[0], weight.shape[0], hidden.shape[1]
        dev, dt = hidden.device, hidden.dtype
        cfg = presets.select(kernel, dt, dev)

        def stage1(dz, r0, c0, rn, cn):
            self._k.launch(kernel, lambda c: (-(-rn // c.BN) * -(-cn // c.BV),), dt, dev, flags, H=hidden, W=weight,
                           dZ=dz, r0=r0, c0=c0, R=rn, C=cn, M=M, V=V, D=D, **args)

        budget = gemm_backward.scratch_budget(M, V, dt, self.scratch_floor)
        self.last_scratch_bytes = gemm_backward.run(stage1, hidden, weight, dh, dw, db, budget, cfg.BN, cfg.BV)

    # ---- single model ----------------------------------------------------------------------------
    def stats_forward(self, hidden, weight, bias, labels, opts, entropy, log_sum_p2):
        part, _ = self._forward("stats_forward", 5, hidden, weight, labels, dict(SOFTCAP=opts.softcap is not None),
                                B=_bias(weight, bias), **_scalars(opts))
        return _finish_stats(*self._k.combine_stats(part), entropy, log_sum_p2)

    def _frozen_run(self, kernel, epilogue, products, weight, labels, accs, state):
        """``frozen_forward.run`` with this backend's budget (gemm_backward.scratch_budget) and chunk cap: the
        vocabulary chunks are forced by ``splits`` (tests) as the forward kernels' splits are."""
        from fastpref.kernels import frozen_forward, gemm_backward, presets

        M, V, dt = products[0][0].shape[0], weight.shape[0], products[0][0].dtype
        cfg = presets.select(kernel, dt, products[0][0].device)
        max_chunk = None if self.splits is None else math.ceil(math.ceil(V / cfg.BV) / self.splits) * cfg.BV
        budget = gemm_backward.scratch_budget(M, V, dt, self.scratch_floor)
        self.last_scratch_bytes = frozen_forward.run(epilogue, products, weight, labels, accs, state, budget,
                                                     cfg.BN, cfg.BV, max_chunk)

    def stats_forward_frozen(self, hidden, weight, bias, labels, opts, entropy, log_sum_p2):
        """stats_forward plus EA = E_p[(dz/dx)·W] (and EC with entropy) in 2 GEMMs (3 with entropy) per block
        of rows × vocabulary chunk: logits product, the ``stats_frozen`` epilogue, accumulating product(s)
        (``kernels/frozen_forward.py``; scratch within the gemm backward's budget, ``last_scratch_bytes``)."""
        from fastpref.kernels import frozen_forward

        M, D = hidden.shape
        dev, dt = hidden.device, hidden.dtype
        row = frozen_forward.STATS_STATE.index
        state = frozen_forward.new_state(M, len(frozen_forward.STATS_STATE), dev)
        a = torch.zeros((M, D), device=dev, dtype=torch.float32)
        t = torch.zeros_like(a) if entropy else None
        accs = [frozen_forward.Accumulator(a, scale=row("scale"), label=row("w_label"))]
        if entropy:  # T ← T·scale + A·(shift·scale) + P2·W
            accs.append(frozen_forward.Accumulator(t, scale=row("scale"), label=row("w2_label"),
                                                   coupled=row("shift_scale")))
        b = _bias(weight, bias)
        flags = dict(SOFTCAP=opts.softcap is not None, ENTROPY=entropy)

        def epilogue(xs, ps, r0, c0, rn, cn):
            self._k.launch("stats_frozen", lambda c: (-(-rn // c.BN),), dt, dev, flags, X=xs[0], B=b, Labels=labels,
                           State=state, P=ps[0], P2=ps[-1], r0=r0, c0=c0, R=rn, C=cn, M=M, **_scalars(opts))

        self._frozen_run("stats_frozen", epilogue, [(hidden, weight)], weight, labels, accs, state)
        m, s, t_sum, s2, z_label = state[:5]
        if t is not None:  # EC = (T − (t/s)·A)/s, from A before its normalisation
            t.addcmul_(a, (-t_sum / s)[:, None]).div_(s[:, None])
        a.div_(s[:, None])
        logp, lse, ent, p2 = _finish_stats(m, s, t_sum, s2, z_label, entropy, log_sum_p2)
        return logp, lse, ent, p2, a, t

    def stats_backward(self, hidden, weight, bias, labels, lse, entropy, grad_logp, grad_lse, grad_entropy,
                       opts, needs):
        zero = torch.zeros_like(lse)
        return self._backward(
            "stats_backward", hidden, weight, bias, needs, dict(SOFTCAP=opts.softcap is not None),
            B=_bias(weight, bias), Labels=labels, Lse=lse,
            Ent=zero if (entropy is None or grad_entropy is None) else entropy,
            G_logp=zero if grad_logp is None else grad_logp, G_lse=zero if grad_lse is None else grad_lse,
            G_ent=zero if (entropy is None or grad_entropy is None) else grad_entropy, **_scalars(opts))

    # ---- two models ------------------------------------------------------------------------------
    @staticmethod
    def _pair(weight, bias, ref_weight, ref_bias, labels, M, opts, ref_opts) -> tuple[dict, dict]:
        """Flags and the arguments shared by the KL forward and backward."""
        if labels is None:
            labels = torch.full((M,), -1, device=weight.device, dtype=torch.int64)
        sc, rsc = _scalars(opts), _scalars(ref_opts)
        flags = dict(SOFTCAP=opts.softcap is not None, REF_SOFTCAP=ref_opts.softcap is not None)
        return flags, dict(B=_bias(weight, bias), RB=_bias(ref_weight, ref_bias), Labels=labels, **sc, ref_inv_cap=rsc["inv_cap"],
                           ref_cap_scale=rsc["cap_scale"])

    def kl_forward(self, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, opts, ref_opts,
                   direction):
        ref_hidden, ref_weight, ref_bias = _as_dtype(hidden.dtype, ref_hidden, ref_weight, ref_bias)
        flags, args = self._pair(weight, bias, ref_weight, ref_bias, labels, hidden.shape[0], opts, ref_opts)
        labels_arg = args.pop("Labels")
        part, part64 = self._forward("kl_forward", 6, hidden, weight, labels_arg, flags, n_parts64=2, RH=ref_hidden,
                                     RW=ref_weight, Dr=ref_hidden.shape[1], **args)
        kl, lse, ref_lse, z_label, zr_label = self._k.combine_kl(part, part64, direction == "reverse")
        if labels is None:
            return kl, lse, ref_lse, None, None
        return kl, lse, ref_lse, z_label - lse, zr_label - ref_lse

    def kl_forward_frozen(self, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, opts, ref_opts,
                          direction):
        """kl_forward plus dKL = ∂KL/∂h and (with labels) EA = E_p[(dz/dx)·W], float32 [M, D], in two GEMMs per
        model per block of rows × vocabulary chunk: both logits products, the ``kl_frozen`` epilogue, the
        accumulating products (reverse: A and the centred B; forward: E_p[s·W] and E_p[s·W] − E_q[s·W], p − q formed
        per entry before rounding) (``kernels/frozen_forward.py``, ``kernels/kl_frozen.py``)."""
        from fastpref.kernels import frozen_forward

        ref_hidden, ref_weight, ref_bias = _as_dtype(hidden.dtype, ref_hidden, ref_weight, ref_bias)
        M, D = hidden.shape
        dev, dt = hidden.device, hidden.dtype
        flags, args = self._pair(weight, bias, ref_weight, ref_bias, labels, M, opts, ref_opts)
        reverse = direction == "reverse"
        row = frozen_forward.KL_STATE.index
        state = frozen_forward.new_state(M, len(frozen_forward.KL_STATE), dev)
        state[row("mr")] = float("-inf")
        state64 = torch.zeros((len(frozen_forward.KL_STATE64), M), device=dev, dtype=torch.float64)
        a = torch.zeros((M, D), device=dev, dtype=torch.float32)  # A (reverse) or E_p[s·W] (forward)
        second = torch.zeros_like(a)  # B (reverse) or E_p[s·W] − E_q[s·W] (forward), coupled to the first
        accs = [frozen_forward.Accumulator(a, scale=row("scale"), label=row("w_label")),
                frozen_forward.Accumulator(second, scale=row("scale" if reverse else "scale_r"), label=row("w2_label"),
                                           coupled=row("coef"))]

        def epilogue(xs, ps, r0, c0, rn, cn):
            self._k.launch("kl_frozen", lambda c: (-(-rn // c.BN),), dt, dev, flags, X=xs[0], XR=xs[1], State=state,
                           State64=state64, P=ps[0], P2=ps[1], r0=r0, c0=c0, R=rn, C=cn, M=M, reverse=int(reverse),
                           **args)

        self._frozen_run("kl_frozen", epilogue, [(hidden, weight), (ref_hidden, ref_weight)], weight,
                         args["Labels"], accs, state)
        kl, lse, ref_lse, z_label, zr_label = self._k.combine_kl(state[:6, None], state64[:, None], reverse)
        if reverse:
            s = state64[frozen_forward.KL_STATE64.index("s")].float()[:, None]
            a, dkl = a.div_(s), second.div_(s)
        else:  # accumulated normalised (kernels/kl_frozen.py): E_p[s·W] and dKL themselves
            dkl = second
        if labels is None:
            return kl, lse, ref_lse, None, None, dkl, None
        return kl, lse, ref_lse, z_label - lse, zr_label - ref_lse, dkl, a

    def kl_backward(self, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lse, ref_lse, kl,
                    grad_kl, grad_logp, opts, ref_opts, direction, needs):
        ref_hidden, ref_weight, ref_bias = _as_dtype(hidden.dtype, ref_hidden, ref_weight, ref_bias)
        flags, args = self._pair(weight, bias, ref_weight, ref_bias, labels, hidden.shape[0], opts, ref_opts)
        zero = torch.zeros_like(lse)
        # E_p[z − zr] = KL + lse − ref_lse for the reverse bracket, exact in float64, passed as hi + lo.
        c = kl.double() + lse.double() - ref_lse.double()
        c_hi = c.float()
        c_lo = (c - c_hi.double()).float()
        return self._backward(
            "kl_backward", hidden, weight, bias, needs, flags, RH=ref_hidden, RW=ref_weight,
            Dr=ref_hidden.shape[1], Lse=lse, RLse=ref_lse, C_hi=c_hi, C_lo=c_lo,
            G_kl=zero if grad_kl is None else grad_kl,
            G_logp=zero if (grad_logp is None or labels is None) else grad_logp,
            reverse=int(direction == "reverse"), **args)


def load():
    try:
        import triton  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise BackendUnavailable(f"triton is not installed ({e})") from e
    try:
        from fastpref.kernels import launch
    except ImportError as e:  # pragma: no cover - broken installation
        raise BackendUnavailable(f"the Triton kernels cannot be imported ({e})") from e
    return TritonBackend(launch)
