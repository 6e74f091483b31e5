"""GEMM backward of token_stats, stage 1: dL/dx of one scratch block of rows × vocabulary, no atomics.

Grid: one program per [BN, BV] tile of the block rows [r0, r0 + R) × columns [c0, c0 + C) (row blocks
grouped for L2 reuse). Each recomputes its logits tile (``dlogits.stats_dx``) and stores dL/dx, rounded to
the input dtype, into dZ [R, C] (row-major). Stage 2 is plain GEMMs on dZ (``gemm_backward``):
dH[r] += dZ·W[c], dW[c] += dZᵀ·H[r], db[c] += Σ_rows dZ, float32 accumulation, deterministic.
"""
import triton
import triton.language as tl

from .dlogits import stats_dx, store_block
from .tiles import grouped_tiles

ARGS = (("H", "in"), ("W", "in"), ("B", "in"), ("Labels", "i64*"), ("Lse", "f32*"), ("Ent", "f32*"),
        ("G_logp", "f32*"), ("G_lse", "f32*"), ("G_ent", "f32*"), ("dZ", "in"),
        ("r0", "i32"), ("c0", "i32"), ("R", "i32"), ("C", "i32"),
        ("M", "i32"), ("V", "i32"), ("D", "i32"), ("inv_temp", "f32"), ("inv_cap", "f32"), ("cap_scale", "f32"))
FLAGS = ("SOFTCAP",)
BLOCKS = ("BN", "BV", "BD", "GROUP")


@triton.jit(do_not_specialize=["r0", "c0", "R", "C"])
def kernel(H, W, B, Labels, Lse, Ent, G_logp, G_lse, G_ent, dZ, r0, c0, R, C,
           M, V, D, inv_temp, inv_cap, cap_scale,
           BN: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr, GROUP: tl.constexpr,
           SOFTCAP: tl.constexpr, INTERP: tl.constexpr):
    pid_n, pid_v = grouped_tiles(tl.program_id(0), tl.cdiv(R, BN), tl.cdiv(C, BV), GROUP)
    dx, _ = stats_dx(H, W, B, Labels, Lse, Ent, G_logp, G_lse, G_ent, r0 + pid_n * BN, c0 + pid_v * BV,
                  tl.minimum(M, r0 + R), tl.minimum(V, c0 + C), D, inv_temp, inv_cap, cap_scale,
                  BN, BV, BD, SOFTCAP, INTERP)
    store_block(dZ, dx, pid_n * BN, pid_v * BV, R, C)
