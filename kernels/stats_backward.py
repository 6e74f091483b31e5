"""Backward of token_stats: one program per (row block, vocabulary block), CCE-style.

Recomputes the [BN, BV] logits tile, forms
    dz = g_logp·[v = y] + p·(g_lse − g_logp − g_ent·(log p + H)),   p = exp(z − lse),
multiplies by dz/dx (softcap derivative and 1/T), and scatters dH, dW, db with float32 atomics
(``tiles.scatter_grads``). Registers stay bounded by the tile, whatever D and V are.
"""
import triton
import triton.language as tl

from .tiles import grouped_tiles, logits_tile, scatter_grads

ARGS = (("H", "in"), ("W", "in"), ("B", "in"), ("Labels", "i64*"), ("Lse", "f32*"), ("Ent", "f32*"),
        ("G_logp", "f32*"), ("G_lse", "f32*"), ("G_ent", "f32*"),
        ("dH", "f32*"), ("dW", "f32*"), ("dB", "f32*"),
        ("M", "i32"), ("V", "i32"), ("D", "i32"), ("need_dh", "i32"), ("need_dw", "i32"), ("need_db", "i32"),
        ("inv_temp", "f32"), ("inv_cap", "f32"), ("cap_scale", "f32"))
FLAGS = ("SOFTCAP",)
BLOCKS = ("BN", "BV", "BD", "BDG", "GROUP")


@triton.jit(do_not_specialize=["need_dh", "need_dw", "need_db"])
def kernel(H, W, B, Labels, Lse, Ent, G_logp, G_lse, G_ent, dH, dW, dB,
           M, V, D, need_dh, need_dw, need_db, inv_temp, inv_cap, cap_scale,
           BN: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr, BDG: tl.constexpr, GROUP: tl.constexpr,
           SOFTCAP: tl.constexpr, INTERP: tl.constexpr):
    pid_n, pid_v = grouped_tiles(tl.program_id(0), tl.cdiv(M, BN), tl.cdiv(V, BV), GROUP)
    rows = pid_n * BN + tl.arange(0, BN)
    cols = pid_v * BV + tl.arange(0, BV)
    rmask = rows < M
    z, dzdx = logits_tile(H, W, B, pid_n * BN, pid_v * BV, M, V, D, inv_temp, inv_cap, cap_scale,
                          BN, BV, BD, SOFTCAP, INTERP)
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
    dz += tl.where(cols[None, :] == labels[:, None], g_logp[:, None], 0.0)
    dx = tl.where(valid, dz * dzdx, 0.0)
    scatter_grads(dx, H, W, dH, dW, dB, pid_n * BN, pid_v * BV, M, V, D, need_dh, need_dw, need_db, BDG, INTERP)
