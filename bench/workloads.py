"""Workloads: inputs, the step each implementation runs, and the model FLOPs of one step.

Every step is a closure over inputs built once (seeded, identical for every implementation), and returns
``(out_sample, grad_sample)``: a few float values used to check that the implementations agree.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fastpref
import fastpref.nn  # noqa: F401  (PreferenceLoss)
from bench import impls as I

BETA = 0.1
SAMPLE = 16
FROZEN = "forward+backward, frozen head"   # lm_head weight with requires_grad=False: only dH is needed
# GEMMs of N·D·V that one step needs at least (the bare-GEMM baseline runs exactly these through torch.mm):
# forward logits; with a backward, their recompute, dH and dW; a frozen head keeps only the forward and dH
# (E_p[W] accumulated in the forward, issue 15).
GEMMS = {"forward": 1, "forward+backward": 4, FROZEN: 2}


@dataclass(frozen=True)
class Entry:
    """One measurement: a workload at one shape, one implementation, one pass."""
    workload: str   # logprobs | dpo | token_kl | listwise | sweep_N | sweep_V | issue5 | latency
    impl: str       # implementation key
    mode: str       # forward | forward+backward | FROZEN
    N: int          # tokens (rows of hidden) per model
    D: int
    V: int
    dtype: str
    T: int = 0      # sequence length (dpo/listwise/issue5); 0 for flat token workloads
    K: int = 0      # responses per prompt: 2 for pairs, 4 for the listwise workload
    warmup: int = 1
    repeats: int = 3

    def key(self) -> tuple:
        return (self.workload, self.impl, self.mode, self.N, self.D, self.V, self.dtype)


# --------------------------------------------------------------------------------------------- inputs
def _gen(seed=0):
    return torch.Generator(device="cpu").manual_seed(seed)


def flat_inputs(e: Entry, device, dtype, ref: bool = False):
    g = _gen()
    h = torch.randn(e.N, e.D, generator=g).to(device, dtype)
    w = (torch.randn(e.V, e.D, generator=g) / e.D ** 0.5).to(device, dtype)
    y = torch.randint(0, e.V, (e.N,), generator=g).to(device)
    gout = torch.randn(e.N, generator=g).to(device)   # upstream gradient of the per-token outputs
    out = dict(h=h, w=w, y=y, gout=gout)
    if ref:
        out["rh"] = (h.float() + 0.5 * torch.randn(e.N, e.D, generator=g).to(device)).to(dtype)
        out["rw"] = (w.float() + 0.3 * torch.randn(e.V, e.D, generator=g).to(device) / e.D ** 0.5).to(dtype)
    return out


def sequence_inputs(e: Entry, device, dtype):
    """S = N/T sequences of T tokens (pairs: chosen first, then rejected; lists: prompt-major K responses);
    the first quarter of each sequence is prompt (label -100). Reference = a perturbed copy of the policy."""
    S = e.N // e.T
    g = _gen()
    h = torch.randn(S, e.T, e.D, generator=g).to(device, dtype)
    w = (torch.randn(e.V, e.D, generator=g) / e.D ** 0.5).to(device, dtype)
    rh = (h.float() + 0.5 * torch.randn(S, e.T, e.D, generator=g).to(device)).to(dtype)
    rw = (w.float() + 0.3 * torch.randn(e.V, e.D, generator=g).to(device) / e.D ** 0.5).to(dtype)
    y = torch.randint(0, e.V, (S, e.T), generator=g).to(device)
    y[:, : e.T // 4] = -100
    scores = torch.randn(S // e.K, e.K, generator=g).to(device) if e.K > 2 else None
    return dict(h=h, w=w, rh=rh, rw=rw, y=y, scores=scores)


def valid_tokens(e: Entry) -> int:
    return e.N - (e.N // e.T) * (e.T // 4) if e.T else e.N


def flops(e: Entry) -> float:
    """Model FLOPs of one step (the GEMMs only; recomputation inside an implementation is not counted)."""
    ndv = float(valid_tokens(e)) * e.D * e.V
    if e.workload in ("logprobs", "sweep_N", "sweep_V", "latency"):
        return {"forward": 2, FROZEN: 4}.get(e.mode, 6) * ndv
    if e.workload == "token_kl":
        # policy fwd 2 + reference fwd 2 + policy bwd 4 (a frozen policy head: dH only, 2)
        return (6 if e.mode == FROZEN else 8) * ndv
    return 8 * ndv                  # dpo / listwise / issue5: policy fwd+bwd 6 + reference fwd 2


def _sample(x) -> list[float]:
    if x is None:
        return []
    return [float(v) for v in x.detach().reshape(-1)[:SAMPLE].float().cpu()]


# --------------------------------------------------------------------------------------------- naive losses
def naive_dpo(seq: torch.Tensor, ref_seq: torch.Tensor) -> torch.Tensor:
    B = seq.shape[0] // 2
    margin = (seq[:B] - ref_seq[:B]) - (seq[B:] - ref_seq[B:])
    return -F.logsigmoid(BETA * margin).mean()


def naive_plackett_luce(seq, ref_seq, scores) -> torch.Tensor:
    K = scores.shape[1]
    x = BETA * (seq - ref_seq).view(-1, K)
    x = torch.gather(x, 1, torch.argsort(-scores, dim=1, stable=True))
    tail_lse = torch.logcumsumexp(x.flip(1), 1).flip(1)
    return -(x - tail_lse)[:, :-1].sum(1).mean()


def naive_token_kl(h, w, rh, rw, y):
    """Forward KL(π_ref‖π_θ) per token and log p(label), from both models' materialized logits."""
    logp_all = torch.log_softmax((h @ w.T).float(), -1)
    with torch.no_grad():
        logq_all = torch.log_softmax((rh @ rw.T).float(), -1)
    kl = (logq_all.exp() * (logq_all - logp_all)).sum(-1)
    return kl, logp_all.gather(1, y[:, None]).squeeze(1)


# --------------------------------------------------------------------------------------------- steps
def build_step(e: Entry, device: torch.device):
    """(inputs, step) for one entry; raises impls.Unavailable where the implementation cannot run."""
    dtype = getattr(torch, e.dtype)
    wl = e.workload
    if wl in ("logprobs", "sweep_N", "sweep_V") and e.impl == I.GEMM:
        return gemm_step(e, device, dtype)
    if wl in ("logprobs", "sweep_N", "sweep_V"):
        return _logprobs_step(e, device, dtype)
    if wl == "token_kl":
        return _kl_step(e, device, dtype)
    if wl in ("dpo", "listwise", "issue5"):
        return _sequence_step(e, device, dtype)
    raise ValueError(f"unknown workload {wl!r}")


def _logprobs_step(e, device, dtype):
    f = I.BY_KEY[e.impl].make(device, dtype)
    x = flat_inputs(e, device, dtype)
    h, w, y, gout = x["h"], x["w"], x["y"], x["gout"]
    if e.mode == "forward":
        def step():
            with torch.no_grad():
                return _sample(f(h, w, y)), []
    else:
        h.requires_grad_(True)
        w.requires_grad_(e.mode != FROZEN)

        def step():
            out = f(h, w, y)
            out.backward(gout)
            gs = _sample(h.grad)
            h.grad = w.grad = None
            return _sample(out), gs
    return x, step


def gemm_step(e: Entry, device, dtype):
    """The bare-GEMM baseline: the N·D·V matrix products of one step (GEMMS[mode]) in the input dtype through
    torch.mm into preallocated outputs, and nothing else: forward Z = H·Wᵀ [N, V]; its recompute; dH = dZ·W;
    dW = dZᵀ·H (dZ: the logits themselves, real data rather than zeros). Every other row divided by this one
    reads as a multiple of the GEMM time measured in the same run."""
    x = flat_inputs(e, device, dtype)
    h, w = x["h"], x["w"]
    z = torch.empty(e.N, e.V, device=device, dtype=dtype)
    dh = torch.empty(e.N, e.D, device=device, dtype=dtype)
    dw = torch.empty(e.V, e.D, device=device, dtype=dtype)
    n = GEMMS[e.mode]

    def step():
        torch.mm(h, w.T, out=z)                   # forward logits
        if n >= 4:
            torch.mm(h, w.T, out=z)               # their recompute in the backward
        if n >= 2:
            torch.mm(z, w, out=dh)                # dH = dZ·W
        if n >= 4:
            torch.mm(z.T, h, out=dw)              # dW = dZᵀ·H
        return [], []                             # not log-probs: no agreement check
    return x, step


def _kl_step(e, device, dtype):
    x = flat_inputs(e, device, dtype, ref=True)
    h, w, rh, rw, y, gout = x["h"], x["w"], x["rh"], x["rw"], x["y"], x["gout"]
    if e.impl.startswith("fastpref["):
        backend, _strategy = I.fastpref_variant(e.impl)
        I.BY_KEY[e.impl].make(device, dtype)  # availability
        fn = lambda: (lambda r: (r.kl, r.logp))(  # noqa: E731
            fastpref.token_kl(h, w, rh, rw, y, direction="forward", backend=backend))
    elif e.impl == "torch":
        fn = lambda: naive_token_kl(h, w, rh, rw, y)  # noqa: E731
    elif e.impl == "torch.compile":
        c = I.compiled(naive_token_kl, "naive_token_kl")
        fn = lambda: c(h, w, rh, rw, y)  # noqa: E731
    else:
        raise I.Unavailable("no full-vocabulary two-model token KL in this implementation")
    h.requires_grad_(True)
    w.requires_grad_(True)

    def step():
        kl, logp = fn()
        ((kl * gout).sum() + logp.sum()).backward()
        gs = _sample(h.grad)
        h.grad = w.grad = None
        return _sample(kl), gs
    return x, step


def _sequence_step(e, device, dtype):
    """Pairwise DPO (K=2) or listwise Plackett-Luce (K>2) with a reference model, forward+backward."""
    x = sequence_inputs(e, device, dtype)
    h, w, rh, rw, y, scores = x["h"], x["w"], x["rh"], x["rw"], x["y"], x["scores"]
    S, T, D = h.shape
    listwise = e.K > 2
    mask = y != -100
    rows = mask.nonzero()[:, 0]
    yv = y[mask]

    if e.impl.startswith("fastpref["):
        backend, _strategy = I.fastpref_variant(e.impl)
        I.BY_KEY[e.impl].make(device, dtype)  # availability
        if listwise:
            mod = fastpref.nn.PreferenceLoss("plackett_luce", layout="list", num_responses=e.K, beta=BETA,
                                             backend=backend)
            fn = lambda: mod(h, w, y, ref_hidden=rh, ref_weight=rw, scores=scores).loss  # noqa: E731
        else:
            mod = fastpref.nn.PreferenceLoss("sigmoid", beta=BETA, backend=backend)
            fn = lambda: mod(h, w, y, ref_hidden=rh, ref_weight=rw).loss  # noqa: E731
    elif e.impl == "liger-dpo":
        if listwise:
            raise I.Unavailable("Liger has no listwise loss")
        mod = I.liger_dpo(device, dtype, BETA)
        fn = lambda: mod(w, h, y, ref_input=rh, ref_weight=rw)[0]  # noqa: E731
    else:
        f = I.BY_KEY[e.impl].make(device, dtype)

        def seq_sums(hid, wt):
            # only the completion tokens go through the head (as TRL does on GPUs); per-sequence sums
            lp = f(hid[mask], wt, yv)
            return torch.zeros(S, device=device, dtype=torch.float32).index_add(0, rows, lp)

        def fn():
            seq = seq_sums(h, w)
            with torch.no_grad():
                ref = seq_sums(rh, rw)
            return naive_plackett_luce(seq, ref, scores) if listwise else naive_dpo(seq, ref)
    h.requires_grad_(True)
    w.requires_grad_(True)

    def step():
        loss = fn()
        loss.backward()
        gs = _sample(h.grad)
        h.grad = w.grad = None
        return _sample(loss), gs
    return x, step
