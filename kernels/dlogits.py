"""dL/dx tiles shared by the backward kernels: the gradient with respect to the pre-cap logit x = h·wᵀ + b.

``stats_dx`` and ``kl_dx`` recompute one [BN, BV] logits tile and return dL/dx (float32, 0 at rows ≥ M and
columns ≥ V) and the tile's weight for gradient filtering: the largest probability in it (p, or max(p, q) for
the KL), or 1 when a label falls inside. Cut Cross-Entropy filters on the probability, not on dL/dx, so the
threshold does not depend on the scale of the upstream gradients (a mean over tokens makes them small). Two kinds of kernels consume it: the atomic backward (stats_backward, kl_backward) scatters
dH, dW, db from it; the GEMM backward (stats_dlogits, kl_dlogits) stores it to a scratch block for
cuBLAS products.
"""
import triton
import triton.language as tl

from .tiles import centred_diff, logits_tile


@triton.jit
def stats_dx(H, W, B, Labels, Lse, Ent, G_logp, G_lse, G_ent, row0, col0, M, V, D,
             inv_temp, inv_cap, cap_scale,
             BN: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr, SOFTCAP: tl.constexpr, INTERP: tl.constexpr):
    """dz = g_logp·[v = y] + p·(g_lse − g_logp − g_ent·(log p + H)), p = exp(z − lse), times dz/dx."""
    rows = row0 + tl.arange(0, BN)
    cols = col0 + tl.arange(0, BV)
    rmask = rows < M
    z, dzdx = logits_tile(H, W, B, row0, col0, M, V, D, inv_temp, inv_cap, cap_scale, BN, BV, BD, SOFTCAP, INTERP)
    lse = tl.load(Lse + rows, mask=rmask, other=0.0)
    ent = tl.load(Ent + rows, mask=rmask, other=0.0)
    g_logp = tl.load(G_logp + rows, mask=rmask, other=0.0)
    g_lse = tl.load(G_lse + rows, mask=rmask, other=0.0)
    g_ent = tl.load(G_ent + rows, mask=rmask, other=0.0)
    labels = tl.load(Labels + rows, mask=rmask, other=-1).to(tl.int32)
    valid = rmask[:, None] & (cols < V)[None, :]
    # A banned token (z = −inf) gets log p = −1e30, not −inf: p = 0 there either way, and the entropy term
    # 0·(log p + H) is then 0, not 0·(−inf) = NaN. (A floor rather than a where(p > 0, ...): no spill.)
    logp = tl.where(valid, tl.maximum(z - lse[:, None], -1e30), 0.0)
    p = tl.where(valid, tl.exp(logp), 0.0)
    dz = p * (g_lse - g_logp)[:, None] - (g_ent[:, None] * p) * (logp + ent[:, None])
    return _with_label(dz, dzdx, valid, cols, labels, g_logp, p)


@triton.jit
def kl_dx(H, W, B, RH, RW, RB, Labels, Lse, RLse, C_hi, C_lo, G_kl, G_logp, row0, col0, M, V, D, Dr, reverse,
          inv_temp, inv_cap, cap_scale, ref_inv_cap, ref_cap_scale,
          BN: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr,
          SOFTCAP: tl.constexpr, REF_SOFTCAP: tl.constexpr, INTERP: tl.constexpr):
    """Policy-side dL/dx of token_kl; p, q the policy's and the reference's softmax:
        forward  KL(ref‖θ): dz = g_kl·(p − q)
        reverse  KL(θ‖ref): dz = g_kl·p·((z − zr) − C),  C = E_p[z − zr] = C_hi + C_lo (float32 pair)
    plus g_logp·([v = y] − p); z − zr is formed exactly (two-sum) so the bracket keeps float32 precision."""
    rows = row0 + tl.arange(0, BN)
    cols = col0 + tl.arange(0, BV)
    rmask = rows < M
    z, dzdx = logits_tile(H, W, B, row0, col0, M, V, D, inv_temp, inv_cap, cap_scale, BN, BV, BD, SOFTCAP, INTERP)
    zr, _ = logits_tile(RH, RW, RB, row0, col0, M, V, Dr, inv_temp, ref_inv_cap, ref_cap_scale,
                        BN, BV, BD, REF_SOFTCAP, INTERP)
    lse = tl.load(Lse + rows, mask=rmask, other=0.0)
    rlse = tl.load(RLse + rows, mask=rmask, other=0.0)
    g_kl = tl.load(G_kl + rows, mask=rmask, other=0.0)
    g_logp = tl.load(G_logp + rows, mask=rmask, other=0.0)
    labels = tl.load(Labels + rows, mask=rmask, other=-1).to(tl.int32)
    valid = rmask[:, None] & (cols < V)[None, :]
    logp = tl.where(valid, z - lse[:, None], 0.0)
    logq = tl.where(valid, zr - rlse[:, None], 0.0)
    p = tl.where(valid, tl.exp(logp), 0.0)
    q = tl.where(valid, tl.exp(logq), 0.0)
    if reverse != 0:
        c_hi = tl.load(C_hi + rows, mask=rmask, other=0.0)
        c_lo = tl.load(C_lo + rows, mask=rmask, other=0.0)
        bracket = centred_diff(z, zr, valid, c_hi, c_lo)
        dz = g_kl[:, None] * tl.where(p > 0, p * bracket, 0.0)  # 0 at banned tokens, not 0·NaN
    else:
        dz = g_kl[:, None] * (p - q)
    dz -= g_logp[:, None] * p
    peak = tl.maximum(p, q)
    return _with_label(dz, dzdx, valid, cols, labels, g_logp, peak)


@triton.jit
def _with_label(dz, dzdx, valid, cols, labels, g_logp, peak):
    """(dL/dx = (dz + g_logp·[v = y])·dz/dx [BN, BV], 0 outside ``valid``; the tile's weight: the largest of
    ``peak`` [BN, BV] in it, or 1 when a label falls inside)."""
    at_label = cols[None, :] == labels[:, None]
    dz += tl.where(at_label, g_logp[:, None], 0.0)
    weight = tl.max(tl.max(tl.where(at_label, 1.0, peak), axis=1), axis=0)
    return tl.where(valid, dz * dzdx, 0.0), weight


@triton.jit
def store_block(dZ, dx, row0, col0, R, C):
    """dZ[row0 + i, col0 + j] = dx[i, j] (rounded to dZ's dtype) for the part inside the [R, C] scratch block."""
    BN: tl.constexpr = dx.shape[0]
    BV: tl.constexpr = dx.shape[1]
    lr = row0 + tl.arange(0, BN)
    lc = col0 + tl.arange(0, BV)
    base = dZ + tl.cast(row0, tl.int64) * C
    off = tl.arange(0, BN)[:, None] * C + lc[None, :]
    tl.store(base + off, dx.to(dZ.dtype.element_ty), mask=(lr < R)[:, None] & (lc < C)[None, :])
