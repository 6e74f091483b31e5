"""Backward of token_kl (policy side only): one program per (row block, vocabulary block).

Recomputes both logits tiles and the policy's dL/dx (``dlogits.kl_dx``; with p, q the policy's and the
reference's softmax, forward KL(ref‖θ): dz = g_kl·(p − q), reverse KL(θ‖ref): dz = g_kl·p·((z − zr) − C),
C = E_p[z − zr] = KL + lse − ref_lse as a float32 pair), then the float32 atomic scatter of ``tiles.scatter_grads``.
The direction is a runtime scalar (``reverse``) so that both share one compiled kernel.
"""
import triton
import triton.language as tl

from .dlogits import kl_dx
from .tiles import grouped_tiles, scatter_grads

ARGS = (("H", "in"), ("W", "in"), ("B", "in"), ("RH", "in"), ("RW", "in"), ("RB", "in"),
        ("Labels", "i64*"), ("Lse", "f32*"), ("RLse", "f32*"), ("C_hi", "f32*"), ("C_lo", "f32*"), ("G_kl", "f32*"), ("G_logp", "f32*"),
        ("dH", "f32*"), ("dW", "f32*"), ("dB", "f32*"),
        ("M", "i32"), ("V", "i32"), ("D", "i32"), ("Dr", "i32"), ("reverse", "i32"),
        ("need_dh", "i32"), ("need_dw", "i32"), ("need_db", "i32"),
        ("inv_temp", "f32"), ("inv_cap", "f32"), ("cap_scale", "f32"), ("ref_inv_cap", "f32"),
        ("ref_cap_scale", "f32"), ("filter_eps", "f32"))
FLAGS = ("SOFTCAP", "REF_SOFTCAP")
BLOCKS = ("BN", "BV", "BD", "BDG", "GROUP")


@triton.jit(do_not_specialize=["reverse", "need_dh", "need_dw", "need_db"])
def kernel(H, W, B, RH, RW, RB, Labels, Lse, RLse, C_hi, C_lo, G_kl, G_logp, dH, dW, dB,
           M, V, D, Dr, reverse, need_dh, need_dw, need_db,
           inv_temp, inv_cap, cap_scale, ref_inv_cap, ref_cap_scale, filter_eps,
           BN: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr, BDG: tl.constexpr, GROUP: tl.constexpr,
           SOFTCAP: tl.constexpr, REF_SOFTCAP: tl.constexpr, INTERP: tl.constexpr):
    pid_n, pid_v = grouped_tiles(tl.program_id(0), tl.cdiv(M, BN), tl.cdiv(V, BV), GROUP)
    dx, weight = kl_dx(H, W, B, RH, RW, RB, Labels, Lse, RLse, C_hi, C_lo, G_kl, G_logp, pid_n * BN, pid_v * BV, M, V, D, Dr,
               reverse, inv_temp, inv_cap, cap_scale, ref_inv_cap, ref_cap_scale, BN, BV, BD, SOFTCAP, REF_SOFTCAP,
               INTERP)
    # Gradient filtering (Cut Cross-Entropy): a tile with no label and every probability below filter_eps is
    # skipped. filter_eps = 0 (the default) keeps every tile: exact results.
    if weight >= filter_eps:
        scatter_grads(dx, H, W, dH, dW, dB, pid_n * BN, pid_v * BV, M, V, D, need_dh, need_dw, need_db, BDG, INTERP)
