"""Forward of token_stats: per row block, stream over a range of vocabulary tiles.

Grid: row blocks × vocabulary splits, flattened and grouped (``tiles.grouped_tiles``). Each program keeps, per row, the running max m, s = Σe^{z−m},
t = Σe^{z−m}(z−m), s2 = Σe^{2(z−m)} and the label's logit, and writes them as one split's partials
Part[k, split, row] (k = m, s, t, s2, z_label); a tiny torch reduction (``launch.combine_stats``)
merges the splits. Small-N problems use several splits so that the GPU still fills up.
"""
import triton
import triton.language as tl

from .tiles import grouped_tiles, label_pick, logits_tile, lse_step

# Argument order and kinds, shared by the launcher and the ahead-of-time report.
# "in": pointer of the input dtype; "f32*"/"i64*": float32/int64 pointers; "i32"/"f32": scalars.
ARGS = (("H", "in"), ("W", "in"), ("B", "in"), ("Labels", "i64*"), ("Part", "f32*"),
        ("M", "i32"), ("V", "i32"), ("D", "i32"), ("n_splits", "i32"), ("tiles_per_split", "i32"),
        ("inv_temp", "f32"), ("inv_cap", "f32"), ("cap_scale", "f32"))
FLAGS = ("SOFTCAP",)
BLOCKS = ("BN", "BV", "BD", "GROUP")


@triton.jit(do_not_specialize=["n_splits", "tiles_per_split"])
def kernel(H, W, B, Labels, Part, M, V, D, n_splits, tiles_per_split, inv_temp, inv_cap, cap_scale,
           BN: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr, GROUP: tl.constexpr,
           SOFTCAP: tl.constexpr, INTERP: tl.constexpr):
    # GROUP row blocks × all their splits are consecutive programs: the hidden-state tiles of a group stay in
    # L2 while its splits stream different vocabulary ranges (launch.vocab_splits picks whole waves).
    pid_n, split = grouped_tiles(tl.program_id(0), tl.cdiv(M, BN), n_splits, GROUP)
    rows = pid_n * BN + tl.arange(0, BN)
    rmask = rows < M
    labels = tl.load(Labels + rows, mask=rmask, other=-1).to(tl.int32)
    m = tl.full((BN,), float("-inf"), tl.float32)
    s = tl.zeros((BN,), tl.float32)
    t = tl.zeros((BN,), tl.float32)
    s2 = tl.zeros((BN,), tl.float32)
    z_label = tl.zeros((BN,), tl.float32)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(V, BV))
    for j in range(first, last):
        z, _ = logits_tile(H, W, B, pid_n * BN, j * BV, M, V, D, inv_temp, inv_cap, cap_scale,
                           BN, BV, BD, SOFTCAP, INTERP)
        m, s, t, s2, z_label = stats_step(z, j * BV + tl.arange(0, BV), labels, m, s, t, s2, z_label)
    stride = n_splits * M
    out = Part + split * M + rows
    tl.store(out, m, mask=rmask)
    tl.store(out + stride, s, mask=rmask)
    tl.store(out + 2 * stride, t, mask=rmask)
    tl.store(out + 3 * stride, s2, mask=rmask)
    tl.store(out + 4 * stride, z_label, mask=rmask)


@triton.jit
def stats_step(z, cols, labels, m, s, t, s2, z_label):
    """Fold one logits tile z [BN, BV] (−inf at masked and banned columns) of columns ``cols`` into the running
    (m, s, t, s2, z_label) described above; returns them."""
    m_new, shift, e = lse_step(z, m, s)
    scale = tl.exp(shift)
    d = tl.where(e > 0, z - m_new[:, None], 0.0)  # e·d = 0 at −inf columns (masked or banned), not NaN
    t = (t + shift * s) * scale + tl.sum(e * d, axis=1)
    s2 = s2 * scale * scale + tl.sum(e * e, axis=1)
    s = s * scale + tl.sum(e, axis=1)
    return m_new, s, t, s2, z_label + label_pick(z, cols, labels)
