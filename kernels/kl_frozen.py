"""Frozen-policy-head forward of token_kl, the epilogue of one pair of logits blocks: online state and weights.

Host side in ``frozen_forward``: per block of rows × one vocabulary chunk, two GEMMs write the float32 products
X = h·wᵀ (policy) and XR = rh·rwᵀ (reference) [R, C]; this kernel folds them into kl_forward's running sums and
writes the weights of the two accumulating GEMMs (s_v = (dz/dx)_v of the policy's transform, d = z − zr; p, q
the policy's and the reference's softmax over the columns so far, normalised by the running sums):
    reverse:  P  = e^{z − m_new}·s               → A = Σ e^{z−m}·s·W,                 EA = A/s
              P2 = e^{z − m_new}·(d − μ_new)·s   → B = Σ e^{z−m}·(d − μ)·s·W,         dKL = B/s
    forward:  P  = p·s                           → Ap = E_p[s·W] = EA
              P2 = (p − q)·s                     → Dq = E_p[s·W] − E_q[s·W] = dKL
with μ = cr/s the running mean of d under p (float64 sums; d − μ formed exactly, ``tiles.centred_diff``). The
forward direction forms p − q per entry in float32 before the weights are rounded to the input dtype: a policy
close to its reference (p ≈ q, the KL-penalty regime) would otherwise lose dKL to the rounding of two nearly
equal sums; and EA is accumulated on its own rather than as E_q[s·W] + dKL, whose rounded terms at tokens the
reference favours would not cancel to the (1 − p_y)-sized rest the backward needs. As the running sums grow,
Ap ← α·Ap + P·W and Dq ← β·Dq + (α − β)·Ap + P2·W (Ap before its rescale), with
α = e^{m_old − m_new}·s_old/s_new and β = e^{mr_old − mr_new}·sr_old/sr_new.

Grid: one program per BN rows of the block; each walks the chunk's C columns in BV-wide tiles twice:
  1. z, zr (``tiles.transform``): kl_forward's online step (``kl_forward.kl_step``: both maxima and sums, the
     cross terms, the label logits), so that m_new, mr_new and μ_new are known before any weight is written;
  2. z, zr again: the weights P, P2 (input dtype), 0 at −inf logits (banned tokens, and every column while
     the running max is still −inf); the label's column is written as 0 and its float32 entries go to the state
     (``tiles.split_label``; without labels every label is −1 and nothing is split off).
State [11, M] float32, rows r0 + [0, R): m, mr, sr, cf, z_label, zr_label (kl_forward's Part rows, updated in
place), then this chunk's coefficients: reverse, scale = e^{m_old − m_new}, scale_r = e^{mr_old − mr_new},
coef = (μ_old − μ_new)·scale (B ← B·scale + A·coef before A's own rescale); forward, scale = α, scale_r = β,
coef = α − β; the chunk's label entries P_y, P2_y; State64 [2, M] float64: s, cr.
"""
import triton
import triton.language as tl

from .kl_forward import kl_step
from .tiles import block_rows, centred_diff, max_shift, split_label, transform

ARGS = (("X", "f32*"), ("XR", "f32*"), ("B", "in"), ("RB", "in"), ("Labels", "i64*"), ("State", "f32*"),
        ("State64", "f64*"), ("P", "in"), ("P2", "in"), ("r0", "i32"), ("c0", "i32"), ("R", "i32"), ("C", "i32"),
        ("M", "i32"), ("reverse", "i32"), ("inv_temp", "f32"), ("inv_cap", "f32"), ("cap_scale", "f32"),
        ("ref_inv_cap", "f32"), ("ref_cap_scale", "f32"))
FLAGS = ("SOFTCAP", "REF_SOFTCAP")
BLOCKS = ("BN", "BV")


@triton.jit
def _pair(X, XR, B, RB, row0, j, c0, R, C, inv_temp, inv_cap, cap_scale, ref_inv_cap, ref_cap_scale,
          BN: tl.constexpr, BV: tl.constexpr, SOFTCAP: tl.constexpr, REF_SOFTCAP: tl.constexpr,
          INTERP: tl.constexpr):
    """(z, dz/dx, zr, block-local columns, their mask, in-block offsets) of the [BN, BV] tiles at block row row0,
    chunk column j."""
    lc = j + tl.arange(0, BV)
    cmask = lc < C
    off = tl.arange(0, BN)[:, None] * C + lc[None, :]
    mask = ((row0 + tl.arange(0, BN)) < R)[:, None] & cmask[None, :]
    base = tl.cast(row0, tl.int64) * C
    x = tl.load(X + base + off, mask=mask, other=0.0)
    xr = tl.load(XR + base + off, mask=mask, other=0.0)
    z, dzdx = transform(x, B, c0 + j, cmask, inv_temp, inv_cap, cap_scale, SOFTCAP, INTERP)
    zr, _ = transform(xr, RB, c0 + j, cmask, inv_temp, ref_inv_cap, ref_cap_scale, REF_SOFTCAP, INTERP)
    return z, dzdx, zr, lc, cmask, off


@triton.jit
def _mean(s, cr):
    """μ = cr/s (0 while s = 0) as a float32 pair hi + lo (no float64 division: a called routine on GPUs)."""
    s32 = tl.where(s > 0, s.to(tl.float32), 1.0)
    hi = tl.where(s > 0, cr.to(tl.float32) / s32, 0.0)
    lo = tl.where(s > 0, (cr - hi.to(tl.float64) * s).to(tl.float32) / s32, 0.0)
    return hi, lo


@triton.jit
def _inverse(x):
    """1/x, 0 where x = 0 (no mass yet: every column so far banned)."""
    return tl.where(x > 0, 1.0 / tl.where(x > 0, x, 1.0), 0.0)


@triton.jit(do_not_specialize=["r0", "c0", "R", "C", "reverse"])
def kernel(X, XR, B, RB, Labels, State, State64, P, P2, r0, c0, R, C, M, reverse,
           inv_temp, inv_cap, cap_scale, ref_inv_cap, ref_cap_scale,
           BN: tl.constexpr, BV: tl.constexpr, SOFTCAP: tl.constexpr, REF_SOFTCAP: tl.constexpr,
           INTERP: tl.constexpr):
    row0, rmask, rows, labels = block_rows(Labels, r0, c0, R, BN)
    m_old = tl.load(State + rows, mask=rmask, other=0.0)
    mr_old = tl.load(State + M + rows, mask=rmask, other=0.0)
    s_old = tl.load(State64 + rows, mask=rmask, other=0.0)
    cr_old = tl.load(State64 + M + rows, mask=rmask, other=0.0)
    m, mr, s, cr = m_old, mr_old, s_old, cr_old
    sr = tl.load(State + 2 * M + rows, mask=rmask, other=0.0)
    sr_old = sr
    cf = tl.load(State + 3 * M + rows, mask=rmask, other=0.0)
    z_label = tl.load(State + 4 * M + rows, mask=rmask, other=0.0)
    zr_label = tl.load(State + 5 * M + rows, mask=rmask, other=0.0)
    for j in range(0, C, BV):
        z, _, zr, lc, cmask, _ = _pair(X, XR, B, RB, row0, j, c0, R, C, inv_temp, inv_cap, cap_scale, ref_inv_cap,
                                       ref_cap_scale, BN, BV, SOFTCAP, REF_SOFTCAP, INTERP)
        m, mr, s, sr, cf, cr, z_label, zr_label = kl_step(z, zr, lc, cmask, labels, m, mr, s, sr, cf, cr,
                                                          z_label, zr_label)
    _, base = max_shift(m, m)
    _, base_r = max_shift(mr, mr)
    mu_hi, mu_lo = _mean(s, cr)
    inv_s = _inverse(s.to(tl.float32))
    inv_sr = _inverse(sr)
    p_base = tl.cast(row0, tl.int64) * C
    w_label = tl.zeros((BN,), dtype=tl.float32)
    w2_label = tl.zeros((BN,), dtype=tl.float32)
    for j in range(0, C, BV):
        z, dzdx, zr, lc, cmask, off = _pair(X, XR, B, RB, row0, j, c0, R, C, inv_temp, inv_cap, cap_scale,
                                            ref_inv_cap, ref_cap_scale, BN, BV, SOFTCAP, REF_SOFTCAP, INTERP)
        e = tl.exp(z - base[:, None])
        mask = rmask[:, None] & cmask[None, :]
        if reverse != 0:
            w1 = e
            bracket = centred_diff(z, zr, mask, mu_hi, mu_lo)
            w2 = tl.where(e > 0, e * bracket, 0.0)  # 0 at banned tokens, not 0·NaN
        else:  # normalised; the difference p − q in float32, before the weights are rounded
            w1 = e * inv_s[:, None]
            w2 = w1 - tl.exp(zr - base_r[:, None]) * inv_sr[:, None]
        w1, at1 = split_label(w1 * dzdx, lc, labels)
        w2, at2 = split_label(w2 * dzdx, lc, labels)
        w_label += at1
        w2_label += at2
        tl.store(P + p_base + off, w1.to(P.dtype.element_ty), mask=mask)
        tl.store(P2 + p_base + off, w2.to(P2.dtype.element_ty), mask=mask)
    shift, _ = max_shift(m_old, m)
    shift_r, _ = max_shift(mr_old, mr)
    scale = tl.exp(shift)
    scale_r = tl.exp(shift_r)
    old_hi, old_lo = _mean(s_old, cr_old)
    coef = ((old_hi - mu_hi) + (old_lo - mu_lo)) * scale
    alpha = scale * s_old.to(tl.float32) * inv_s  # forward: the normalised sums' rescale
    beta = scale_r * sr_old * inv_sr
    fwd = reverse == 0
    tl.store(State + rows, m, mask=rmask)
    tl.store(State + M + rows, mr, mask=rmask)
    tl.store(State + 2 * M + rows, sr, mask=rmask)
    tl.store(State + 3 * M + rows, cf, mask=rmask)
    tl.store(State + 4 * M + rows, z_label, mask=rmask)
    tl.store(State + 5 * M + rows, zr_label, mask=rmask)
    tl.store(State + 6 * M + rows, tl.where(fwd, alpha, scale), mask=rmask)
    tl.store(State + 7 * M + rows, tl.where(fwd, beta, scale_r), mask=rmask)
    tl.store(State + 8 * M + rows, tl.where(fwd, alpha - beta, coef), mask=rmask)
    tl.store(State + 9 * M + rows, w_label, mask=rmask)
    tl.store(State + 10 * M + rows, w2_label, mask=rmask)
    tl.store(State64 + rows, s, mask=rmask)
    tl.store(State64 + M + rows, cr, mask=rmask)
