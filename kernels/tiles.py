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
def logits_tile(H, W, B, rows, cols, M, V, D, inv_temp, inv_cap, cap_scale,
                BN: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr,
                HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, INTERP: tl.constexpr):
    """(z [BN, BV] float32 with −inf at columns ≥ V, dz/dx [BN, BV] or the scalar 1/T)."""
    rmask = rows < M
    cmask = cols < V
    offs_d = tl.arange(0, BD)
    h_ptrs = H + rows.to(tl.int64)[:, None] * D + offs_d[None, :]
    w_ptrs = W + cols.to(tl.int64)[None, :] * D + offs_d[:, None]  # [BD, BV]: wᵀ
    acc = tl.zeros((BN, BV), dtype=tl.float32)
    for d0 in range(0, D, BD):
        dmask = (offs_d + d0) < D
        h = load_upcast(h_ptrs, rmask[:, None] & dmask[None, :], INTERP)
        w = load_upcast(w_ptrs, dmask[:, None] & cmask[None, :], INTERP)
        acc = mma(h, w, acc)
        h_ptrs += BD
        w_ptrs += BD
    if HAS_BIAS:
        acc += tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if SOFTCAP:
        c = tanh(acc * inv_cap, INTERP)
        z = c * cap_scale
        dzdx = (1.0 - c * c) * inv_temp
    else:
        z = acc * inv_temp
        dzdx = inv_temp
    z = tl.where(cmask[None, :], z, float("-inf"))
    return z, dzdx


@triton.jit
def lse_step(z, m, s):
    """One online log-sum-exp step over tile z: (m_new, shift = m − m_new (0 on the first tile), e = e^{z−m_new}).

    The caller rescales its running sums by exp(shift); e is 0 at masked (−inf) columns.
    """
    m_new = tl.maximum(m, tl.max(z, axis=1))
    shift = tl.where(m == float("-inf"), 0.0, m - m_new)
    e = tl.exp(z - m_new[:, None])
    return m_new, shift, e


@triton.jit
def label_pick(z, cols, labels):
    """z[row, label] where the label falls in this tile, else 0 (rows × columns)."""
    return tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), axis=1)


@triton.jit
def grouped_tiles(pid, n_row_blocks, n_col_blocks, GROUP: tl.constexpr):
    """Swizzle a flat program id into (row block, column block) so GROUP row blocks share column blocks in L2."""
    per_group = GROUP * n_col_blocks
    first = (pid // per_group) * GROUP
    size = tl.minimum(n_row_blocks - first, GROUP)
    local = pid % per_group
    return first + local % size, local // size


@triton.jit
def scatter_grads(dx, H, W, dH, dW, dB, rows, cols, M, V, D, need_dh, need_dw, need_db,
                  BD: tl.constexpr, INTERP: tl.constexpr):
    """dH[rows] += dx·W[cols], dW[cols] += dxᵀ·H[rows], dB[cols] += Σ_rows dx (float32 atomics).

    dx [BN, BV] float32, zero at masked rows/columns. It is rounded to the input dtype for the
    tensor-core products (accumulation stays float32).
    """
    rmask = rows < M
    cmask = cols < V
    if need_db != 0:
        tl.atomic_add(dB + cols, tl.sum(dx, axis=0), mask=cmask, sem="relaxed")
    if INTERP:
        g = dx
    else:
        g = dx.to(W.dtype.element_ty)
    offs_d = tl.arange(0, BD)
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    if need_dh != 0:
        w_ptrs = W + cols64[:, None] * D + offs_d[None, :]
        o_ptrs = dH + rows64[:, None] * D + offs_d[None, :]
        for d0 in range(0, D, BD):
            dmask = (offs_d + d0) < D
            w = load_upcast(w_ptrs, cmask[:, None] & dmask[None, :], INTERP)
            part = mma(g, w, tl.zeros((g.shape[0], BD), dtype=tl.float32))
            tl.atomic_add(o_ptrs, part, mask=rmask[:, None] & dmask[None, :], sem="relaxed")
            w_ptrs += BD
            o_ptrs += BD
    if need_dw != 0:
        gt = tl.trans(g)
        h_ptrs = H + rows64[:, None] * D + offs_d[None, :]
        o_ptrs = dW + cols64[:, None] * D + offs_d[None, :]
        for d0 in range(0, D, BD):
            dmask = (offs_d + d0) < D
            h = load_upcast(h_ptrs, rmask[:, None] & dmask[None, :], INTERP)
            part = mma(gt, h, tl.zeros((gt.shape[0], BD), dtype=tl.float32))
            tl.atomic_add(o_ptrs, part, mask=cmask[:, None] & dmask[None, :], sem="relaxed")
            h_ptrs += BD
            o_ptrs += BD
