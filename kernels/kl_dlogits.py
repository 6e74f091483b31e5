"""GEMM backward of token_kl (policy side), stage 1: dL/dx of one scratch block, no atomics.

As ``stats_dlogits``, with the KL tile gradient ``dlogits.kl_dx`` (both models' logits recomputed).
"""
import triton
import triton.language as tl

from .dlogits import kl_dx, store_block
from .tiles import grouped_tiles

ARGS = (("H", "in"), ("W", "in"), ("B", "in"), ("RH", "in"), ("RW", "in"), ("RB", "in"),
        ("Labels", "i64*"), ("Lse", "f32*"), ("RLse", "f32*"), ("C_hi", "f32*"), ("C_lo", "f32*"), ("G_kl", "f32*"),
        ("G_logp", "f32*"), ("dZ", "in"), ("r0", "i32"), ("c0", "i32"), ("R", "i32"), ("C", "i32"),
        ("M", "i32"), ("V", "i32"), ("D", "i32"), ("Dr", "i32"), ("reverse", "i32"),
        ("inv_temp", "f32"), ("inv_cap", "f32"), ("cap_scale", "f32"), ("ref_inv_cap", "f32"),
        ("ref_cap_scale", "f32"))
FLAGS = ("SOFTCAP", "REF_SOFTCAP")
BLOCKS = ("BN", "BV", "BD", "GROUP")


@triton.jit(do_not_specialize=["r0", "c0", "R", "C", "reverse"])
def kernel(H, W, B, RH, RW, RB, Labels, Lse, RLse, C_hi, C_lo, G_kl, G_logp, dZ, r0, c0, R, C,
           M, V, D, Dr, reverse, inv_temp, inv_cap, cap_scale, ref_inv_cap, ref_cap_scale,
           BN: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr, GROUP: tl.constexpr,
           SOFTCAP: tl.constexpr, REF_SOFTCAP: tl.constexpr, INTERP: tl.constexpr):
    pid_n, pid_v = grouped_tiles(tl.program_id(0), tl.cdiv(R, BN), tl.cdiv(C, BV), GROUP)
    dx, _ = kl_dx(H, W, B, RH, RW, RB, Labels, Lse, RLse, C_hi, C_lo, G_kl, G_logp, r0 + pid_n * BN, c0 + pid_v * BV,
               tl.minimum(M, r0 + R), tl.minimum(V, c0 + C), D, Dr, reverse, inv_temp, inv_cap, cap_scale,
               ref_inv_cap, ref_cap_scale, BN, BV, BD, SOFTCAP, REF_SOFTCAP, INTERP)
    store_block(dZ, dx, pid_n * BN, pid_v * BV, R, C)
