"""Frozen-head forward of token_stats, host side: two GEMMs per block (three with entropy), bounded scratch.

When the head needs no gradient the forward also forms, per row (``fastpref._frozen``, flash-attention style)
    A = Σ_v e^{z_v − m}·(dz/dx)_v·W_v            and, with entropy,   T = Σ_v e^{z_v − m}·(z_v − m)·(dz/dx)_v·W_v
(m the running max), so that the backward needs no pass over the vocabulary. For each block of R rows and
each vocabulary chunk of C columns:
    X = H[r]·W[c]ᵀ                                  GEMM 1: the logits product, float32 output       [R, C]
    stats_frozen(X)                                 one Triton kernel: bias, temperature, softcap, the online
                                                    m, s, t, s2, label logit; weights P (and P2) in the
                                                    input dtype; per row scale = e^{m_old − m_new}
    T ← T·scale + A·(shift·scale);  T += P2·W[c]    GEMM 3 (entropy only)
    A ← A·scale;                    A += P·W[c]     GEMM 2
The GEMMs are cuBLAS through torch (``gemm_backward.mm_into`` / ``mm_accumulate``: float32 output and
accumulation, tensor cores for fp16/bf16). In all: 2 GEMMs of 2·N·D·V FLOPs (3 with entropy) for the forward
and none in the backward (``fastpref._frozen.hidden_grad`` is a gather and a few [N, D] products), where the
plain path needs the forward's, the recompute's and dH's (3; the weight's dW is skipped for a frozen head).

Extra memory traffic against two bare GEMMs, per chunk: the rescale reads and writes A once (8·R·D bytes;
with entropy T twice more and A once more, 20·R·D), on top of the accumulating GEMM's own read of A; and per
logit, X written (4 bytes) and read by the kernel (4, up to 8 with its second pass), P written and read (2 + 2
for bf16; P2 as much again). The rescale's share is 8·N·D·⌈V/C⌉ bytes in all, hence chunks of thousands of
columns; the per-logit traffic is 11–14 % of the two GEMMs' time at D = 4096 (4.8 TB/s, 700 TFLOP/s), and the
kernel and the rescale do not overlap the GEMMs (one stream). None of this has been measured on a GPU yet
(docs/gpu-strategies.md).

Scratch: X [R, C] float32 plus P (and P2) [R, C] in the input dtype, R·C·(4 + itemsize·(1 + entropy)) ≤ budget,
the gemm backward's ``scratch_budget`` (max(256 MiB, 1% of the naive logits)); the block shape is
``gemm_backward.block_shape`` (all rows when they fit, otherwise about square, so both GEMMs stay large:
bf16, 256 MiB: about 6600 × 6600 without entropy, 5800 × 5800 with it). Besides the scratch: the state, 7 float32 per row, and the outputs A, T.
"""
from __future__ import annotations

from typing import Callable

import torch

from .gemm_backward import block_shape, mm_accumulate, mm_into

STATE_ROWS = 7  # m, s, t, s2, z_label, scale, shift·scale (kernels/stats_frozen.py)
ROW_ALIGN = 128  # block rows are a multiple of this (or all rows): whole GEMM tiles


def element_bytes(dtype: torch.dtype, entropy: bool) -> int:
    """Scratch bytes per (row, column) of a block: the float32 product and the weight tile(s) in ``dtype``."""
    return 4 + torch.empty((), dtype=dtype).element_size() * (2 if entropy else 1)


def new_state(rows: int, device: torch.device) -> torch.Tensor:
    """The running state [STATE_ROWS, rows] float32: m = −inf, everything else 0."""
    state = torch.zeros((STATE_ROWS, rows), device=device, dtype=torch.float32)
    state[0] = float("-inf")
    return state


def run(epilogue: Callable[..., None], hidden: torch.Tensor, weight: torch.Tensor, a: torch.Tensor,
        t: torch.Tensor | None, state: torch.Tensor, budget: int, bn: int, bv: int,
        max_chunk: int | None = None) -> int:
    """Accumulate A (and T), float32 [M, D] zeros on entry, and the running state [7, M] over the vocabulary.

    epilogue(x, p, p2, r0, c0, R, C) runs ``stats_frozen`` on x [R, C] float32 (rows r0.., columns c0..), filling
    p (and p2, None without entropy) [R, C] in the input dtype and the state's scale rows. ``max_chunk`` caps the
    chunk width (tests). bn, bv: the kernel's tile; block rows are a multiple of max(bn, ROW_ALIGN) (or all
    rows), columns of bv (or the whole vocabulary). Returns the scratch size in bytes (≤ budget)."""
    M, V = hidden.shape[0], weight.shape[0]
    per = element_bytes(hidden.dtype, t is not None)
    R, C = block_shape(M, V, budget // per, max(bn, ROW_ALIGN), bv)
    C = C if max_chunk is None else min(C, max_chunk)
    x_buf = torch.empty(R * C, device=hidden.device, dtype=torch.float32)
    p_buf = torch.empty(R * C, device=hidden.device, dtype=hidden.dtype)
    p2_buf = torch.empty(R * C, device=hidden.device, dtype=hidden.dtype) if t is not None else None
    for r0 in range(0, M, R):
        rn = min(R, M - r0)
        a_r = a[r0:r0 + rn]
        t_r = None if t is None else t[r0:r0 + rn]
        scale, shift_scale = state[5, r0:r0 + rn, None], state[6, r0:r0 + rn, None]
        for c0 in range(0, V, C):
            cn = min(C, V - c0)
            w = weight[c0:c0 + cn]
            x = x_buf[: rn * cn].view(rn, cn)
            p = p_buf[: rn * cn].view(rn, cn)
            p2 = None if p2_buf is None else p2_buf[: rn * cn].view(rn, cn)
            mm_into(x, hidden[r0:r0 + rn], w.t())  # GEMM 1: the logits product
            epilogue(x, p, p2, r0, c0, rn, cn)
            if t_r is not None:
                t_r.mul_(scale).addcmul_(a_r, shift_scale)  # T ← (T + shift·A)·scale, with A before its rescale
                mm_accumulate(t_r, p2, w)  # GEMM 3 (entropy)
            a_r.mul_(scale)
            mm_accumulate(a_r, p, w)  # GEMM 2
    return sum(b.numel() * b.element_size() for b in (x_buf, p_buf, p2_buf) if b is not None)
