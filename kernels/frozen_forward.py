"""Frozen-head forwards, host side: token_stats with two GEMMs per block (three with entropy), token_kl with
two per model; bounded scratch.

When the head needs no gradient the forward also forms, per row (``fastpref._frozen``, flash-attention style)
    A = Σ_v e^{z_v − m}·(dz/dx)_v·W_v        and, with entropy,   T = Σ_v e^{z_v − m}·(z_v − m)·(dz/dx)_v·W_v
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
bf16, 256 MiB: about 6600 × 6600 without entropy, 5800 × 5800 with it). Besides the scratch: the state, 7
float32 per row (``STATS_STATE``), and the outputs A, T.

token_kl with a frozen policy head (``kl_frozen``) runs the same loop with two products per chunk (policy
and reference logits, X and XR) and two accumulators, the second coupled to the first (reverse direction:
A = Σ e^{z−m}·s·W and the centred B = Σ e^{z−m}·(d − μ)·s·W, B ← B·scale + A·(μ_old − μ_new)·scale; forward:
Ap = E_p[s·W] and E_p[s·W] − E_q[s·W] normalised as they go, with p − q formed per entry; kernels/kl_frozen.py):
two GEMMs per model, scratch 2·4 + 2·itemsize bytes per element of a block.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .gemm_backward import block_shape, ieee_float32, mm_accumulate, mm_into

# The epilogues' running state, one float32 row each per token (kernels/stats_frozen.py, kernels/kl_frozen.py);
# "scale"/"scale_r" rescale the accumulators, "shift_scale"/"coef" couple T/B to A.
# "w_label"/"w2_label": the chunk's float32 label entries of the two weight tiles, whose label column is 0.
STATS_STATE = ("m", "s", "t", "s2", "z_label", "scale", "shift_scale", "w_label", "w2_label")
KL_STATE = ("m", "mr", "sr", "cf", "z_label", "zr_label", "scale", "scale_r", "coef", "w_label", "w2_label")
KL_STATE64 = ("s", "cr")  # float64, as kl_forward's Part64
ROW_ALIGN = 128  # block rows are a multiple of this (or all rows): whole GEMM tiles


@dataclass
class Accumulator:
    """One float32 [M, D] accumulator: per chunk out ← out·state[scale] (+ A·state[coupled], A the first
    accumulator before its own rescale) + P·W[c], P the weight tile the epilogue wrote for it.

    The label's entry of P is not in the tile (the epilogue writes 0 there, ``tiles.split_label``) but in
    state[label], float32: it is folded with the same recurrence into a float32 per-row weight w and added as
    w·W[y] once the row block has seen every chunk, so that the label's term is never rounded to the input
    dtype (the backward subtracts the accumulator from the exact (dz/dx)_y·W_y)."""

    out: torch.Tensor
    scale: int
    label: int
    coupled: int | None = None


def _fold(accumulators: Sequence[Accumulator], state: torch.Tensor, rows: slice, tiles: Sequence[torch.Tensor],
          weights: Sequence[torch.Tensor], chunk: torch.Tensor) -> None:
    """One chunk into every accumulator's rows: the [R, D] products (tiles: P [R, C] per accumulator, chunk: W[c])
    and the label weights (float32 [R] each), A last (the coupled ones read it before its rescale)."""
    a, wa = accumulators[0].out[rows], weights[0].clone()
    for acc, p, w in reversed(list(zip(accumulators, tiles, weights))):
        out = acc.out[rows]
        out.mul_(state[acc.scale, rows, None])
        w.mul_(state[acc.scale, rows])
        if acc.coupled is not None:
            out.addcmul_(a, state[acc.coupled, rows, None])
            w.addcmul_(wa, state[acc.coupled, rows])
        w.add_(state[acc.label, rows])
        mm_accumulate(out, p, chunk)  # one accumulating product per weight tile


def element_bytes(dtype: torch.dtype, products: int, weights: int) -> int:
    """Scratch bytes per (row, column) of a block: the float32 products and the weight tiles in ``dtype``."""
    return 4 * products + torch.empty((), dtype=dtype).element_size() * weights


def new_state(rows: int, count: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A running state [count, rows]: row 0 (the running max) −inf, the others 0."""
    state = torch.zeros((count, rows), device=device, dtype=dtype)
    state[0] = float("-inf")
    return state


def run(epilogue: Callable[..., None], products: Sequence[tuple[torch.Tensor, torch.Tensor]], weight: torch.Tensor,
        labels: torch.Tensor, accumulators: Sequence[Accumulator], state: torch.Tensor, budget: int, bn: int, bv: int,
        max_chunk: int | None = None) -> int:
    """Fold the whole vocabulary into ``accumulators`` (zeros on entry) and the epilogue's running state.

    products: (hidden [M, D_k], weight [V, D_k]) per model, one dtype; per chunk X_k = hidden[r]·weight[c]ᵀ.
    weight: the head whose rows are accumulated (the policy's); labels [M] int64 (any value outside [0, V) where
    a row has none: its label weights stay 0). epilogue(xs, ps, r0, c0, R, C) runs the Triton
    epilogue on the products xs [R, C] float32 (rows r0.., columns c0..), fills one weight tile ps[i] [R, C]
    (input dtype) per accumulator and the state rows the accumulators name. ``max_chunk`` caps the chunk width
    (tests). bn, bv: the kernel's tile; block rows are a multiple of max(bn, ROW_ALIGN) (or all rows), columns
    of bv (or the whole vocabulary). float32 products run in IEEE float32 (``gemm_backward.ieee_float32``).
    Returns the scratch size in bytes (≤ budget)."""
    hidden = products[0][0]
    M, V = hidden.shape[0], weight.shape[0]
    per = element_bytes(hidden.dtype, len(products), len(accumulators))
    R, C = block_shape(M, V, budget // per, max(bn, ROW_ALIGN), bv)
    C = C if max_chunk is None else min(C, max_chunk)
    x_bufs = [torch.empty(R * C, device=hidden.device, dtype=torch.float32) for _ in products]
    p_bufs = [torch.empty(R * C, device=hidden.device, dtype=hidden.dtype) for _ in accumulators]
    with ieee_float32():
        for r0 in range(0, M, R):
            _row_block(epilogue, products, weight, labels, accumulators, state, x_bufs, p_bufs, r0, min(R, M - r0), C)
    return sum(b.numel() * b.element_size() for b in x_bufs + p_bufs)


def _row_block(epilogue: Callable[..., None], products: Sequence[tuple[torch.Tensor, torch.Tensor]],
               weight: torch.Tensor, labels: torch.Tensor, accumulators: Sequence[Accumulator], state: torch.Tensor,
               x_bufs: Sequence[torch.Tensor], p_bufs: Sequence[torch.Tensor], r0: int, rn: int, C: int) -> None:
    """``run`` for the rows r0 + [0, rn): every vocabulary chunk of C columns (x_bufs: float32 product scratch,
    p_bufs: weight tiles in the input dtype, [R·C] each), then the label terms w·W[y] (float32 [rn, D])."""
    V = weight.shape[0]
    rows = slice(r0, r0 + rn)
    label_w = [torch.zeros(rn, device=weight.device, dtype=torch.float32) for _ in accumulators]
    for c0 in range(0, V, C):
        cn = min(C, V - c0)
        xs = [b[: rn * cn].view(rn, cn) for b in x_bufs]
        ps = [b[: rn * cn].view(rn, cn) for b in p_bufs]
        for x, (h, w) in zip(xs, products):
            mm_into(x, h[rows], w[c0:c0 + cn].t())  # the logits products
        epilogue(xs, ps, r0, c0, rn, cn)
        _fold(accumulators, state, rows, ps, label_w, weight[c0:c0 + cn])
    w_y = weight[labels[rows].clamp(0, V - 1)].float()  # [R, D]; rows without a label have weight 0
    for acc, w in zip(accumulators, label_w):
        acc.out[rows].addcmul_(w[:, None], w_y)
