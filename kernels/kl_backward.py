"""Backward of token_kl (policy side only): one program per (row block, vocabulary block).

Recomputes both logits tiles; with p, q the policy's and the reference's softmax:
    forward  KL(ref‖θ): dz = g_kl·(p − q)
    reverse  KL(θ‖ref): dz = g_kl·p·(log p − log q − KL) = g_kl·p·((z − zr) − C),  C = E_p[z − zr]
plus g_logp·([v = y] − p); then dz/dx and the float32 atomic scatter of ``tiles.scatter_grads``.
C = KL + lse − ref_lse comes as a float32 pair (C_hi + C_lo) and z − zr is formed exactly (two-sum), so the
bracket keeps float32 precision even where |z| ≈ 1e4 makes log q itself coarse.
The direction is a runtime scalar (``reverse``) so that both share one compiled kernel.
"""
import triton
import triton.language as tl

from .tiles import grouped_tiles, logits_tile, scatter_grads

ARGS = (("H", "in"), ("W", "in"), ("B", "in"), ("RH", "in"), ("RW", "in"), ("RB", "in"),
        ("Labels", "i64*"), ("Lse", "f32*"), ("RLse", "f32*"), ("C_hi", "f32*"), ("C_lo", "f32*"), ("G_kl", "f32*"), ("G_logp", "f32*"),
        ("dH", "f32*"), ("dW", "f32*"), ("dB", "f32*"),
        ("M", "i32"), ("V", "i32"), ("D", "i32"), ("Dr", "i32"), ("reverse", "i32"),
        ("need_dh", "i32"), ("need_dw", "i32"), ("need_db", "i32"),
        ("inv_temp", "f32"), ("inv_cap", "f32"), ("cap_scale", "f32"), ("ref_inv_cap", "f32"),
        ("ref_cap_scale", "f32"))
FLAGS = ("SOFTCAP", "REF_SOFTCAP")
BLOCKS = ("BN", "BV", "BD", "BDG", "GROUP")


@triton.jit(do_not_specialize=["reverse", "need_dh", "need_dw", "need_db"])
def kernel(H, W, B, RH, RW, RB, Labels, Lse, RLse, C_hi, C_lo, G_kl, G_logp, dH, dW, dB,
           M, V, D, Dr, reverse, need_dh, need_dw, need_db,
           inv_temp, inv_cap, cap_scale, ref_inv_cap, ref_cap_scale,
           BN: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr, BDG: tl.constexpr, GROUP: tl.constexpr,
           SOFTCAP: tl.constexpr, REF_SOFTCAP: tl.constexpr, INTERP: tl.constexpr):
    pid_n, pid_v = grouped_tiles(tl.program_id(0), tl.cdiv(M, BN), tl.cdiv(V, BV), GROUP)
    rows = pid_n * BN + tl.arange(0, BN)
    cols = pid_v * BV + tl.arange(0, BV)
    rmask = rows < M
    z, dzdx = logits_tile(H, W, B, pid_n * BN, pid_v * BV, M, V, D, inv_temp, inv_cap, cap_scale,
                          BN, BV, BD, SOFTCAP, INTERP)
    zr, _ = logits_tile(RH, RW, RB, pid_n * BN, pid_v * BV, M, V, Dr, inv_temp, ref_inv_cap, ref_cap_scale,
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
    if reverse != 0:
        c_hi = tl.load(C_hi + rows, mask=rmask, other=0.0)
        c_lo = tl.load(C_lo + rows, mask=rmask, other=0.0)
        zf = tl.where(valid, z, 0.0)
        zrf = tl.where(valid, zr, 0.0)
        d_hi = zf - zrf
        back = d_hi - zf
        d_lo = (zf - (d_hi - back)) - (zrf + back)  # two-sum: z − zr = d_hi + d_lo exactly
        bracket = tl.where(valid, (d_hi - c_hi[:, None]) + (d_lo - c_lo[:, None]), 0.0)
        dz = g_kl[:, None] * tl.where(p > 0, p * bracket, 0.0)  # 0 at banned tokens, not 0·NaN
    else:
        dz = g_kl[:, None] * (p - tl.where(valid, tl.exp(logq), 0.0))
    dz -= g_logp[:, None] * p
    dz += tl.where(cols[None, :] == labels[:, None], g_logp[:, None], 0.0)
    dx = tl.where(valid, dz * dzdx, 0.0)
    scatter_grads(dx, H, W, dH, dW, dB, pid_n * BN, pid_v * BV, M, V, D, need_dh, need_dw, need_db, BDG, INTERP)
