"""Frozen-head forward of token_stats, the epilogue of one logits block: online state and softmax weights.

Host side in ``frozen_forward``: per block of rows × one vocabulary chunk, a GEMM writes the float32 product
X = h·wᵀ [R, C]; this kernel turns it into the chunk's share of the online softmax; GEMMs then fold the weights
into the flash-attention-style accumulators A (and T) of ``fastpref._frozen``.

Grid: one program per BN rows of the block; each walks the chunk's C columns in BV-wide tiles twice:
  1. z = cap(x + b)/T (``tiles.transform``): stats_forward's online step (``stats_forward.stats_step``: the
     running m, s = Σe^{z−m}, t = Σe^{z−m}(z − m), s2 = Σe^{2(z−m)}, the label's logit), so that the new
     running max m_new is known before any weight is written;
  2. z again, e = e^{z − m_new}, and the weights
         P  = e·(dz/dx)                 [R, C], input dtype   (A ← A·scale + P·W_chunk)
         P2 = e·(z − m_new)·(dz/dx)     [R, C], input dtype   (T ← (T + shift·A)·scale + P2·W_chunk; ENTROPY)
     (0 at −inf logits: banned tokens, and every column while the running max is still −inf). The label's
     column is written as 0 and its float32 entries (P_y, P2_y) go to the state instead (``tiles.split_label``).
The second pass reads the same rows again right after the first (partly from L2; at most 4 more bytes per logit).

State [9, M] float32, rows r0 + [0, R): the running m, s, t, s2, z_label (updated in place), then this chunk's
scale = e^{shift} and shift·scale, shift = m_old − m_new (0 while m_old is −inf), for the accumulators' rescale,
and the chunk's label entries P_y, P2_y (0 when the label is in another chunk).
"""
import triton
import triton.language as tl

from .stats_forward import stats_step
from .tiles import block_rows, max_shift, split_label, transform

ARGS = (("X", "f32*"), ("B", "in"), ("Labels", "i64*"), ("State", "f32*"), ("P", "in"), ("P2", "in"),
        ("r0", "i32"), ("c0", "i32"), ("R", "i32"), ("C", "i32"), ("M", "i32"),
        ("inv_temp", "f32"), ("inv_cap", "f32"), ("cap_scale", "f32"))
FLAGS = ("SOFTCAP", "ENTROPY")
BLOCKS = ("BN", "BV")


@triton.jit
def _logits(X, B, row0, j, c0, R, C, inv_temp, inv_cap, cap_scale,
            BN: tl.constexpr, BV: tl.constexpr, SOFTCAP: tl.constexpr, INTERP: tl.constexpr):
    """(z, dz/dx, block-local columns, in-block offsets) of the [BN, BV] tile at block row row0, chunk column j."""
    lr = row0 + tl.arange(0, BN)
    lc = j + tl.arange(0, BV)
    cmask = lc < C
    off = tl.arange(0, BN)[:, None] * C + lc[None, :]
    x = tl.load(X + tl.cast(row0, tl.int64) * C + off, mask=(lr < R)[:, None] & cmask[None, :], other=0.0)
    z, dzdx = transform(x, B, c0 + j, cmask, inv_temp, inv_cap, cap_scale, SOFTCAP, INTERP)
    return z, dzdx, lc, off


@triton.jit(do_not_specialize=["r0", "c0", "R", "C"])
def kernel(X, B, Labels, State, P, P2, r0, c0, R, C, M, inv_temp, inv_cap, cap_scale,
           BN: tl.constexpr, BV: tl.constexpr, SOFTCAP: tl.constexpr, ENTROPY: tl.constexpr,
           INTERP: tl.constexpr):
    row0, rmask, rows, labels = block_rows(Labels, r0, c0, R, BN)
    m_old = tl.load(State + rows, mask=rmask, other=0.0)
    s_old = tl.load(State + M + rows, mask=rmask, other=0.0)
    m, s = m_old, s_old
    t = tl.load(State + 2 * M + rows, mask=rmask, other=0.0)
    s2 = tl.load(State + 3 * M + rows, mask=rmask, other=0.0)
    z_label = tl.load(State + 4 * M + rows, mask=rmask, other=0.0)
    for j in range(0, C, BV):
        z, _, lc, _ = _logits(X, B, row0, j, c0, R, C, inv_temp, inv_cap, cap_scale, BN, BV, SOFTCAP, INTERP)
        m, s, t, s2, z_label = stats_step(z, lc, labels, m, s, t, s2, z_label)
    _, base = max_shift(m, m)
    p_base = tl.cast(row0, tl.int64) * C
    w_label = tl.zeros((BN,), dtype=tl.float32)
    w2_label = tl.zeros((BN,), dtype=tl.float32)
    for j in range(0, C, BV):
        z, dzdx, lc, off = _logits(X, B, row0, j, c0, R, C, inv_temp, inv_cap, cap_scale, BN, BV, SOFTCAP, INTERP)
        e = tl.exp(z - base[:, None])
        mask = rmask[:, None] & (lc < C)[None, :]
        w, at = split_label(e * dzdx, lc, labels)
        w_label += at
        tl.store(P + p_base + off, w.to(P.dtype.element_ty), mask=mask)
        if ENTROPY:
            ed = e * tl.where(e > 0, z - m[:, None], 0.0)  # 0 at −inf logits, not 0·(−inf)
            w2, at2 = split_label(ed * dzdx, lc, labels)
            w2_label += at2
            tl.store(P2 + p_base + off, w2.to(P2.dtype.element_ty), mask=mask)
    shift, _ = max_shift(m_old, m)
    scale = tl.exp(shift)
    tl.store(State + rows, m, mask=rmask)
    tl.store(State + M + rows, s, mask=rmask)
    tl.store(State + 2 * M + rows, t, mask=rmask)
    tl.store(State + 3 * M + rows, s2, mask=rmask)
    tl.store(State + 4 * M + rows, z_label, mask=rmask)
    tl.store(State + 5 * M + rows, scale, mask=rmask)
    tl.store(State + 6 * M + rows, shift * scale, mask=rmask)
    tl.store(State + 7 * M + rows, w_label, mask=rmask)
    tl.store(State + 8 * M + rows, w2_label, mask=rmask)
