"""Device helpers shared by every kernel: one logits tile, the online log-sum-exp step, tanh, gradient scatter.

A logits tile is z = cap(h·wᵀ + b)/T for rows [BN] × vocabulary columns [BV], computed in float32 from a
loop over D in BD chunks (tensor-core dots for fp16/bf16 inputs on GPUs, exact fp32 dots otherwise).
Columns ≥ V come back as −inf so that exp() gives 0 there.
"""
import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def load_upcast(ptrs, mask, INTERP: tl.constexpr):
    """Masked load; the interpreter gets float32 (it cannot do fp16/bf16 arithmetic reliably)."""
    x = tl.load(ptrs, mask=mask, other=0.0)
    if INTERP:
        x = x.to(tl.float32)
    return x


@triton.jit
def mma(a, b, acc):
    """acc + a·b with float32 accumulation; float32 operands use exact (non-TF32) products."""
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def tanh(x, INTERP: tl.constexpr):
    if INTERP:
        # The interpreter has no libdevice: odd Taylor series near 0, (1 − e^{−2|x|})/(1 + e^{−2|x|}) elsewhere.
        a = tl.abs(x)
        e = tl.exp(-2.0 * a)
        big = (1.0 - e) / (1.0 + e)
        a2 = a * a
        poly = 21844.0 / 6081075.0
        poly = poly * a2 - 1382.0 / 155925.0
        poly = poly * a2 + 62.0 / 2835.0
        poly = poly * a2 - 17.0 / 315.0
        poly = poly * a2 + 2.0 / 15.0
        poly = poly * a2 - 1.0 / 3.0
        small = a + a * a2 * poly
        r = tl.where(a < 0.25, small, big)
        return tl.where(x < 0, -r, r)
    else:
        return libdevice.tanh(x)


@triton.jit
def logits_tile(H, W, B, row0, col0, M, V, D, inv_temp, inv_cap, cap_scale,
                BN: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr,
                SOFTCAP: tl.constexpr, INTERP: tl.constexpr):
    """(z [BN, BV] float32 with −inf at columns ≥ V, dz/dx [BN, BV] or the scalar 1/T) for rows row0 + [0, BN)
    and columns col0 + [0, BV). Addresses are a 64-bit scalar base plus 32-bit in-tile offsets (few registers)."""
    lr = tl.arange(0, BN)
    lc = tl.arange(0, BV)
    offs_d = tl.arange(0, BD)
    rmask = (row0 + lr) < M
    cmask = (col0 + lc) < V
    h_base = H + tl.cast(row0, tl.int64) * D
    w_base = W + tl.cast(col0, tl.int64) * D
    h_off = lr[:, None] * D + offs_d[None, :]
    w_off = lc[None, :] * D + offs_d[:, None]  # [BD, BV]: wᵀ
    acc = tl.zeros((BN, BV), dtype=tl.float32)
    for d0 in range(0, D, BD):
        dmask = (offs_d + d0) < D
        h = load_upcast(h_base + d0 + h_off, rmask[:, None] & dmask[None, :], INTERP)
        w = load_upcast(w_base + d0 + w_off, dmask[:, None] & cmask[None, :], INTERP)
        acc = mma(h, w, acc)
    return transform(acc, B, col0, cmask, inv_temp, inv_cap, cap_scale, SOFTCAP, INTERP)


@triton.jit
def transform(x, B, col0, cmask, inv_temp, inv_cap, cap_scale, SOFTCAP: tl.constexpr, INTERP: tl.constexpr):
    """(z, dz/dx) from the product x = h·wᵀ [BN, BV] (float32) of columns col0 + [0, BV): z = cap(x + b)/T,
    −inf at columns outside ``cmask`` [BV]; dz/dx [BN, BV], or the scalar 1/T without a softcap."""
    BV: tl.constexpr = x.shape[1]
    # The bias is always added (a zero vector stands in for none): one [BV] load per tile, and half as
    # many compiled variants.
    x += tl.load(B + col0 + tl.arange(0, BV), mask=cmask, other=0.0).to(tl.float32)[None, :]
    if SOFTCAP:
        c = tanh(x * inv_cap, INTERP)
        z = c * cap_scale
        dzdx = (1.0 - c * c) * inv_temp
    else:
        z = x * inv_temp
        dzdx = inv_temp
    z = tl.where(cmask[None, :], z, float("-inf"))
    return z, dzdx


@triton.jit
def lse_step(z, m, s):
    """One online log-sum-exp step over tile z: (m_new, shift = m − m_new (0 on the first tile), e = e^{z−m_new}).

    The caller rescales its running sums by exp(shift); e is 0 at masked and banned (−inf) columns, also
    while every logit so far is −inf (then 0 is subtracted instead of m_new: exp(−inf − (−inf)) is NaN).
    """
    m_new = tl.maximum(m, tl.max(z, axis=1))
    shift, base = max_shift(m, m_new)
    e = tl.exp(z - base[:, None])
    return m_new, shift, e


@triton.jit
def max_shift(m, m_new):
    """(shift = m − m_new, 0 while m is −inf; base = m_new, 0 while m_new is −inf) for a running max m → m_new:
    running sums are rescaled by exp(shift) and new terms are e^{z − base} (0 at −inf logits, never NaN)."""
    shift = tl.where(m == float("-inf"), 0.0, m - m_new)
    base = tl.where(m_new == float("-inf"), 0.0, m_new)
    return shift, base


@triton.jit
def centred_diff(z, zr, valid, c_hi, c_lo):
    """(z − zr) − C [BN, BV] float32, 0 outside ``valid``; C [BN] per row as a float32 pair c_hi + c_lo.

    z − zr is formed exactly (two-sum: d_hi + d_lo), so the difference keeps float32 precision relative to
    itself even where |z|, |zr| ≈ 1e4 and C ≈ z − zr."""
    zf = tl.where(valid, z, 0.0)
    zrf = tl.where(valid, zr, 0.0)
    d_hi = zf - zrf
    back = d_hi - zf
    d_lo = (zf - (d_hi - back)) - (zrf + back)
    return tl.where(valid, (d_hi - c_hi[:, None]) + (d_lo - c_lo[:, None]), 0.0)


@triton.jit
def label_pick(z, cols, labels):
    """z[row, label] where the label falls in this tile, else 0 (rows × columns)."""
    return tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), axis=1)


@triton.jit
def split_label(w, cols, labels):
    """(w with its label column set to 0, the label's entry [BN] float32, 0 where the label is outside the tile).

    The frozen epilogues round their weight tiles to the input dtype for the accumulating GEMMs; the label's
    weight is carried apart in float32 instead (``frozen_forward``: added back as w_y·W_y after the chunks), because
    the backward subtracts E_p[(dz/dx)·W] from the exact (dz/dx)_y·W_y and, at p_y near 1, the rounding of the
    label's entry would be the whole difference."""
    at_label = cols[None, :] == labels[:, None]
    return tl.where(at_label, 0.0, w), tl.sum(tl.where(at_label, w, 0.0), axis=1)


@triton.jit
def block_rows(Labels, r0, c0, R, BN: tl.constexpr):
    """Rows of a frozen-head epilogue program (one per BN rows of the block r0 + [0, R) × chunk c0 + [0, C)):
    (row0 = its first block row, mask [BN] of block rows < R, global rows r0 + row0 + [0, BN), labels [BN]
    int32 as chunk-local columns label − c0, −1 − c0 at masked rows)."""
    row0 = tl.program_id(0) * BN
    rmask = row0 + tl.arange(0, BN) < R
    rows = r0 + row0 + tl.arange(0, BN)
    labels = tl.load(Labels + rows, mask=rmask, other=-1).to(tl.int32) - c0
    return row0, rmask, rows, labels


@triton.jit
def grouped_tiles(pid, n_row_blocks, n_col_blocks, GROUP: tl.constexpr):
    """Swizzle a flat program id into (row block, column block) so GROUP row blocks share column blocks in L2."""
    per_group = GROUP * n_col_blocks
    first = (pid // per_group) * GROUP
    size = tl.minimum(n_row_blocks - first, GROUP)
    local = pid % per_group
    return first + local % size, local // size


@triton.jit
def scatter_grads(dx, H, W, dH, dW, dB, row0, col0, M, V, D, need_dh, need_dw, need_db,
                  BD: tl.constexpr, INTERP: tl.constexpr):
    """dH[rows] += dx·W[cols], dW[cols] += dxᵀ·H[rows], dB[cols] += Σ_rows dx (float32 atomics).

    dx [BN, BV] float32 for rows row0 + [0, BN), columns col0 + [0, BV), zero at masked rows/columns.
    It is rounded to the input dtype for the tensor-core products (accumulation stays float32).
    """
    BN: tl.constexpr = dx.shape[0]
    BV: tl.constexpr = dx.shape[1]
    lr = tl.arange(0, BN)
    lc = tl.arange(0, BV)
    offs_d = tl.arange(0, BD)
    rmask = (row0 + lr) < M
    cmask = (col0 + lc) < V
    if need_db != 0:
        tl.atomic_add(dB + col0 + lc, tl.sum(dx, axis=0), mask=cmask, sem="relaxed")
    if INTERP:
        g = dx
    else:
        g = dx.to(W.dtype.element_ty)
    row_off = lr[:, None] * D + offs_d[None, :]
    col_off = lc[:, None] * D + offs_d[None, :]
    h_base = tl.cast(row0, tl.int64) * D
    w_base = tl.cast(col0, tl.int64) * D
    if need_dh != 0:
        for d0 in range(0, D, BD):
            dmask = (offs_d + d0) < D
            w = load_upcast(W + w_base + d0 + col_off, cmask[:, None] & dmask[None, :], INTERP)
            part = mma(g, w, tl.zeros((BN, BD), dtype=tl.float32))
            tl.atomic_add(dH + h_base + d0 + row_off, part, mask=rmask[:, None] & dmask[None, :], sem="relaxed")
    if need_dw != 0:
        gt = tl.trans(g)
        for d0 in range(0, D, BD):
            dmask = (offs_d + d0) < D
            h = load_upcast(H + h_base + d0 + row_off, rmask[:, None] & dmask[None, :], INTERP)
            part = mma(gt, h, tl.zeros((BV, BD), dtype=tl.float32))
            tl.atomic_add(dW + w_base + d0 + col_off, part, mask=cmask[:, None] & dmask[None, :], sem="relaxed")
