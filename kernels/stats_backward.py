"""Backward of token_stats: one program per (row block, vocabulary block), CCE-style.

Recomputes the [BN, BV] logits tile and its dL/dx (``dlogits.stats_dx``:
    dz = g_logp·[v = y] + p·(g_lse − g_logp − g_ent·(log p + H)),   p = exp(z − lse),
times dz/dx, the softcap derivative and 1/T), and scatters dH, dW, db with float32 atomics
(``tiles.scatter_grads``). Registers stay bounded by the tile, whatever D and V are.
"""
import triton
import triton.language as tl

from .dlogits import stats_dx
from .tiles import grouped_tiles, scatter_grads

ARGS = (("H", "in"), ("W", "in"), ("B", "in"), ("Labels", "i64*"), ("Lse", "f32*"), ("Ent", "f32*"),
        ("G_logp", "f32*"), ("G_lse", "f32*"), ("G_ent", "f32*"),
        ("dH", "f32*"), ("dW", "f32*"), ("dB", "f32*"),
        ("M", "i32"), ("V", "i32"), ("D", "i32"), ("need_dh", "i32"), ("need_dw", "i32"), ("need_db", "i32"),
        ("inv_temp", "f32"), ("inv_cap", "f32"), ("cap_scale", "f32"), ("filter_eps", "f32"))
FLAGS = ("SOFTCAP",)
BLOCKS = ("BN", "BV", "BD", "BDG", "GROUP")


@triton.jit(do_not_specialize=["need_dh", "need_dw", "need_db"])
def kernel(H, W, B, Labels, Lse, Ent, G_logp, G_lse, G_ent, dH, dW, dB,
           M, V, D, need_dh, need_dw, need_db, inv_temp, inv_cap, cap_scale, filter_eps,
           BN: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr, BDG: tl.constexpr, GROUP: tl.constexpr,
           SOFTCAP: tl.constexpr, INTERP: tl.constexpr):
    pid_n, pid_v = grouped_tiles(tl.program_id(0), tl.cdiv(M, BN), tl.cdiv(V, BV), GROUP)
    dx, weight = stats_dx(H, W, B, Labels, Lse, Ent, G_logp, G_lse, G_ent, pid_n * BN, pid_v * BV, M, V, D,
                  inv_temp, inv_cap, cap_scale, BN, BV, BD, SOFTCAP, INTERP)
    # Gradient filtering (Cut Cross-Entropy): a tile with no label and every probability below filter_eps is
    # skipped. filter_eps = 0 (the default) keeps every tile: exact results.
    if weight >= filter_eps:
        scatter_grads(dx, H, W, dH, dW, dB, pid_n * BN, pid_v * BV, M, V, D, need_dh, need_dw, need_db, BDG, INTERP)
