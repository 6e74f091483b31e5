"""Forward of token_kl: one streaming pass over the vocabulary computing both models' logits tiles.

Grid (row blocks × vocabulary splits, grouped) as in stats_forward. Per row: policy (m, s), reference (mr, sr),
cf = Σ e^{zr−mr}(zr − z) (forward KL, weighted by the reference), cr = Σ e^{z−m}(z − zr) (reverse KL,
weighted by the policy), and both label logits. Partials Part[k, split, row] with
k = m, mr, sr, cf, z_label, zr_label and Part64[k, split, row] with k = s, cr in float64:
the reverse-KL backward needs E_p[z − zr] = cr/s consistent with the float32 logits to better than float32
resolution at |z| ≈ 1e4 (each term e·(z − zr) is exact in float64). ``launch.combine_kl`` merges the
splits and forms the KL.
The policy and the reference may have different hidden sizes (D, Dr).
"""
import triton
import triton.language as tl

from .tiles import grouped_tiles, label_pick, logits_tile, lse_step

ARGS = (("H", "in"), ("W", "in"), ("B", "in"), ("RH", "in"), ("RW", "in"), ("RB", "in"),
        ("Labels", "i64*"), ("Part", "f32*"), ("Part64", "f64*"),
        ("M", "i32"), ("V", "i32"), ("D", "i32"), ("Dr", "i32"), ("n_splits", "i32"), ("tiles_per_split", "i32"),
        ("inv_temp", "f32"), ("inv_cap", "f32"), ("cap_scale", "f32"), ("ref_inv_cap", "f32"),
        ("ref_cap_scale", "f32"))
FLAGS = ("SOFTCAP", "REF_SOFTCAP")
BLOCKS = ("BN", "BV", "BD", "GROUP")


@triton.jit(do_not_specialize=["n_splits", "tiles_per_split"])
def kernel(H, W, B, RH, RW, RB, Labels, Part, Part64, M, V, D, Dr, n_splits, tiles_per_split,
           inv_temp, inv_cap, cap_scale, ref_inv_cap, ref_cap_scale,
           BN: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr, GROUP: tl.constexpr,
           SOFTCAP: tl.constexpr, REF_SOFTCAP: tl.constexpr, INTERP: tl.constexpr):
    # GROUP row blocks × all their splits are consecutive programs: the hidden-state tiles of a group stay in
    # L2 while its splits stream different vocabulary ranges (launch.vocab_splits picks whole waves).
    pid_n, split = grouped_tiles(tl.program_id(0), tl.cdiv(M, BN), n_splits, GROUP)
    rows = pid_n * BN + tl.arange(0, BN)
    rmask = rows < M
    labels = tl.load(Labels + rows, mask=rmask, other=-1).to(tl.int32)
    m = tl.full((BN,), float("-inf"), tl.float32)
    mr = tl.full((BN,), float("-inf"), tl.float32)
    s = tl.zeros((BN,), tl.float64)
    sr = tl.zeros((BN,), tl.float32)
    cf = tl.zeros((BN,), tl.float32)
    cr = tl.zeros((BN,), tl.float64)
    z_label = tl.zeros((BN,), tl.float32)
    zr_label = tl.zeros((BN,), tl.float32)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(V, BV))
    for j in range(first, last):
        cols = j * BV + tl.arange(0, BV)
        z, _ = logits_tile(H, W, B, pid_n * BN, j * BV, M, V, D, inv_temp, inv_cap, cap_scale,
                           BN, BV, BD, SOFTCAP, INTERP)
        zr, _ = logits_tile(RH, RW, RB, pid_n * BN, j * BV, M, V, Dr, inv_temp, ref_inv_cap, ref_cap_scale,
                            BN, BV, BD, REF_SOFTCAP, INTERP)
        m, mr, s, sr, cf, cr, z_label, zr_label = kl_step(z, zr, cols, cols < V, labels, m, mr, s, sr, cf, cr,
                                                          z_label, zr_label)
    stride = n_splits * M
    out = Part + split * M + rows
    tl.store(out, m, mask=rmask)
    tl.store(out + stride, mr, mask=rmask)
    tl.store(out + 2 * stride, sr, mask=rmask)
    tl.store(out + 3 * stride, cf, mask=rmask)
    tl.store(out + 4 * stride, z_label, mask=rmask)
    tl.store(out + 5 * stride, zr_label, mask=rmask)
    out64 = Part64 + split * M + rows
    tl.store(out64, s, mask=rmask)
    tl.store(out64 + stride, cr, mask=rmask)


@triton.jit
def kl_step(z, zr, cols, cmask, labels, m, mr, s, sr, cf, cr, z_label, zr_label):
    """Fold one pair of logits tiles z, zr [BN, BV] (−inf at columns outside cmask [BV]) of columns ``cols`` into
    the running (m, mr, s, sr, cf, cr, z_label, zr_label) described above (s and cr float64); returns them."""
    m_new, shift, e = lse_step(z, m, s)
    mr_new, shift_r, er = lse_step(zr, mr, sr)
    scale = tl.exp(shift)
    scale_r = tl.exp(shift_r)
    zr_finite = tl.where(cmask[None, :], zr, 0.0)
    z_finite = tl.where(cmask[None, :], z, 0.0)
    diff = zr_finite - z_finite
    cf = cf * scale_r + tl.sum(tl.where(er > 0, er * diff, 0.0), axis=1)  # 0 at banned tokens, not NaN
    scale64 = scale.to(tl.float64)
    e64 = e.to(tl.float64)
    diff64 = z_finite.to(tl.float64) - zr_finite.to(tl.float64)
    cr = cr * scale64 + tl.sum(tl.where(e64 > 0, e64 * diff64, 0.0), axis=1)
    s = s * scale64 + tl.sum(e64, axis=1)
    sr = sr * scale_r + tl.sum(er, axis=1)
    z_label += label_pick(z, cols, labels)
    zr_label += label_pick(zr, cols, labels)
    return m_new, mr_new, s, sr, cf, cr, z_label, zr_label
