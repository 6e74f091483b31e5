// fastpref._native_cuda: the binding of the CUDA backend. GEMMs go through ATen (cuBLAS) into float32
// tiles; the fused epilogues are the kernels of epilogue.cu, launched on the current stream.
//
// Same algorithm as the CPU module (csrc/cpu/native_cpu.cpp): the forward loops row blocks × vocabulary
// chunks and keeps per-row running state in float32 [N] arrays; the backward loops chunks × row blocks,
// recomputes each tile, turns it into dL/dx in place and runs dH_block += dx·W_chunk (float32 [N, D]) and
// dW_chunk += dxᵀ·H_block (float32 [C, D] accumulator, written to dW once per chunk).
//
// float32 GEMMs never use TF32: every entry point holds an at::NoTF32Guard (thread-local, nothing global is
// changed), so a user's torch.backends.cuda.matmul.allow_tf32 / set_float32_matmul_precision("high") does not
// reach these products (the epilogues are float32 arithmetic; TF32 logits would cost ~1e-2 in log-probs).
//
// GEMM dtypes: float16/bfloat16 hidden and weight of one dtype are multiplied as they are, on tensor cores,
// with float32 accumulation and float32 output (aten::mm.dtype_out, torch >= 2.9): the logits tile is the
// same float32 tile as with upcast operands up to summation order, since half·half products are exact in
// float32. In the backward the float32 dL/dx tile is rounded to that dtype for the dH/dW products, as the
// Triton backend does (accumulation stays float32). Other combinations (float32, or a half hidden with a
// float32 master weight) read the half operands through float32 copies and run float32 GEMMs.
//
// Frozen heads (stats_forward_frozen, kl_forward_frozen; fastpref/_frozen.py): the forward also accumulates,
// per row block, two float32 [rows, D] sums a and t in the output tensors themselves (token_stats:
// A = Σ e^{z−m}·(dz/dx)·W and, with entropy, T = Σ e^{z−m}(z − m)·(dz/dx)·W; token_kl: see kl_forward_impl).
// Per tile, the FROZEN instance of the forward kernel updates the running stats, overwrites the logits
// tile(s) with the weights of a and t (token_stats' T: a second tile) and writes each row's coefficients
// of the update (epilogue.h: e^{m_old − m_new}, and what t takes from a); one GEMM per accumulator makes the
// products weights·W_chunk (half pairs: the weights rounded to the half dtype, tensor cores, float32
// output, as the backward's dL/dx tile; the label's column is kept apart in float32, FrozenAcc), and one
// rows_update pass folds them in (a ← sa·a + P_a,
// t ← st·t + ta·a + P_t). The first chunk's GEMMs write a and t directly (with V ≤ C there is no fold at
// all); at the end of a row block rows_update normalises (EA = A/s, EC = (T − (t/s)·A)/s). No GEMM here
// accumulates, so gemm_f32's `tmp` is not used on this path.
//
// Scratch (elements), R rows × C vocabulary entries per tile (R = C = 4096 by default):
//     float32: 2·R·C + R·(D + D_ref) + C·(2·D + D_ref) + 2·C + max(R, C)·D  (+ 9·N per-row state)
//              + 3·R·D + 3·R in a frozen-head forward (+ R·D + 4·R with half inputs and labels: the labels'
//              weight rows and their float32 weights)
//     half:    R·C (the rounded dL/dx tile of the backward, the rounded weights tile of a frozen forward)
// — logits tiles (two for token_kl; token_stats' frozen T weights tile is the second), float32 copies of
// upcast hidden blocks / weight chunks (none for half GEMMs) / bias chunks, the dW/db chunk accumulators,
// a product buffer for accumulating half GEMMs; frozen: the products of chunks after the first (2·R·D, only
// when V > C), token_kl's A when EA is not returned (R·D, no labels), the rescale coefficients (3·R).
#include <torch/extension.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/version.h>

#include <algorithm>

#include "epilogue.h"

namespace fastpref_cuda {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;

static int64_t g_rows = 4096;
static int64_t g_chunk = 4096;

static Transform make_transform(double temperature, double softcap) {
  Transform tr;
  tr.softcap = softcap > 0 ? 1 : 0;
  tr.inv_t = static_cast<float>(1.0 / temperature);
  tr.inv_cap = tr.softcap ? static_cast<float>(1.0 / softcap) : 0.f;
  tr.cap_t = tr.softcap ? static_cast<float>(softcap / temperature) : 0.f;
  return tr;
}

static bool has(const OptTensor& t) { return t.has_value() && t->defined(); }
static const float* ptr(const OptTensor& t) { return has(t) ? t->data_ptr<float>() : nullptr; }
static float* ptr(Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

static Tensor f32_rows(const Tensor& x, int64_t r0, int64_t n, Tensor& buf, int64_t cap) {
  Tensor s = x.narrow(0, r0, n);
  if (x.scalar_type() == at::kFloat) return s;
  if (!buf.defined()) buf = at::empty({cap}, x.options().dtype(at::kFloat));
  Tensor out = buf.narrow(0, 0, n * x.size(1)).view({n, x.size(1)});
  out.copy_(s);
  return out;
}

static const float* f32_vec(const OptTensor& b, int64_t c0, int64_t n, Tensor& buf, int64_t cap) {
  if (!has(b)) return nullptr;
  if (b->scalar_type() == at::kFloat) return b->data_ptr<float>() + c0;
  if (!buf.defined()) buf = at::empty({cap}, b->options().dtype(at::kFloat));
  Tensor out = buf.narrow(0, 0, n);
  out.copy_(b->narrow(0, c0, n));
  return out.data_ptr<float>();
}

static void check_head(const Tensor& h, const Tensor& w, const OptTensor& b, const char* who) {
  TORCH_CHECK(h.is_cuda() && w.is_cuda() && h.device() == w.device(), who, ": CUDA tensors on one device");
  TORCH_CHECK(h.dim() == 2 && w.dim() == 2 && h.size(1) == w.size(1), who, ": hidden [N, D], weight [V, D]");
  TORCH_CHECK(h.is_contiguous() && w.is_contiguous(), who, ": contiguous hidden and weight");
  if (has(b)) TORCH_CHECK(b->dim() == 1 && b->size(0) == w.size(0) && b->is_contiguous(), who, ": bias [V]");
}

#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
#define FASTPREF_HALF_GEMM 1
#else
#define FASTPREF_HALF_GEMM 0
#endif

// Whether the GEMMs of x with y run in their own (half) dtype; otherwise both are read as float32.
static bool half_pair(const Tensor& x, const Tensor& y) {
  const auto t = x.scalar_type();
  return FASTPREF_HALF_GEMM && t == y.scalar_type() && (t == at::kHalf || t == at::kBFloat16);
}

// Rows [r0, r0 + n) of x as a GEMM operand: a view for half GEMMs, else as float32 (see f32_rows).
static Tensor operand_rows(const Tensor& x, int64_t r0, int64_t n, bool half, Tensor& buf, int64_t cap) {
  return half ? x.narrow(0, r0, n) : f32_rows(x, r0, n, buf, cap);
}

// out (float32) = a·b, or out += a·b. a and b share one dtype; for half operands the product is formed
// in float32 by cuBLAS (into `tmp`, grown on demand, when accumulating).
static void gemm_f32(Tensor out, const Tensor& a, const Tensor& b, bool accumulate, Tensor& tmp) {
  if (a.scalar_type() == at::kFloat) {
    if (accumulate) out.addmm_(a, b); else at::mm_out(out, a, b);
    return;
  }
#if FASTPREF_HALF_GEMM
  if (!accumulate) {
    at::mm_out(out, a, b, at::kFloat);
    return;
  }
  if (!tmp.defined() || tmp.numel() < out.numel()) tmp = at::empty({out.numel()}, out.options());
  Tensor prod = tmp.narrow(0, 0, out.numel()).view(out.sizes());
  at::mm_out(prod, a, b, at::kFloat);
  out.add_(prod);
#else
  TORCH_CHECK(false, "internal: half GEMM operands need torch >= 2.9");
#endif
}

// The dL/dx tile as the left operand of the dH/dW products: itself, or rounded to `dtype` in `buf` (grown on
// demand).
static Tensor grad_operand(const Tensor& tile, bool half, at::ScalarType dtype, Tensor& buf) {
  if (!half) return tile;
  if (!buf.defined() || buf.numel() < tile.numel()) buf = at::empty({tile.numel()}, tile.options().dtype(dtype));
  Tensor out = buf.narrow(0, 0, tile.numel()).view(tile.sizes());
  out.copy_(tile);
  return out;
}

static const int64_t* lab_ptr(const OptTensor& labels, int64_t N) {
  if (!has(labels)) return nullptr;
  TORCH_CHECK(labels->scalar_type() == at::kLong && labels->is_contiguous() && labels->numel() == N,
              "labels must be contiguous int64 [N]");
  return labels->data_ptr<int64_t>();
}

static Tensor tile_view(Tensor& buf, int64_t rows, int64_t cols) {
  return buf.narrow(0, 0, rows * cols).view({rows, cols});
}

// Frozen heads: a pair of float32 [rows, D] accumulators per row block (a, and t or none), fed per vocabulary
// chunk from the weights tiles the forward kernel wrote (FROZEN instances, see epilogue.h): the products
// weights·W_chunk are float32 GEMMs, or tensor-core GEMMs with float32 output of the weights rounded to the
// half dtype (as the backward's dL/dx tile). The first chunk's products go straight into a / t; later ones
// into `prod` and are folded in with the kernel's per-row rescale coefficients by one rows_update pass.
// Before that rounding the label's column is taken out of each weights tile (set to 0) and its float32 entries
// are folded with the same coefficients into la / lt [rows]; finish() adds la·W_y to a and lt·W_y to t. The
// backward subtracts EA from the exact (dz/dx)_y·W_y: at p_y near 1 a rounded label entry would be the whole
// difference (fp16/bf16 with a temperature or a softcap, where dz/dx ≠ 1).
struct FrozenAcc {
  bool half;
  at::ScalarType dtype;
  int64_t R, D;
  Tensor coef, prod, gbuf, tmp;  // coef: float32 [3, R] (sa, st, ta); prod: float32 [1 or 2, R, D], on demand
  Tensor la, lt;                 // float32 [rows]: the label's weights of a and t (half GEMMs with labels)
  FrozenAcc(bool on, bool half_gemm, const Tensor& hidden, int64_t rows)
      : half(half_gemm), dtype(hidden.scalar_type()), R(rows), D(hidden.size(1)) {
    if (on) coef = at::empty({3 * R}, hidden.options().dtype(at::kFloat));
  }
  RowCoefs coefs() {
    if (!coef.defined()) return {nullptr, nullptr, nullptr};
    float* c = coef.data_ptr<float>();
    return {c, c + R, c + 2 * R};
  }
  // The label's entries of the weights tile w [rows, cols] of chunk c0 (float32 [rows], 0 where the label lies
  // elsewhere); the label's column of w is set to 0.
  static Tensor take_label(const Tensor& w, const Tensor& labels, int64_t c0) {
    Tensor idx = labels - c0;
    Tensor inside = idx.ge(0).logical_and(idx.lt(w.size(1)));
    idx = idx.clamp(0, w.size(1) - 1).unsqueeze(1);
    Tensor got = w.gather(1, idx).squeeze(1);
    Tensor picked = got.masked_fill(inside.logical_not(), 0.0);
    w.scatter_(1, idx, (got - picked).unsqueeze(1));
    return picked;
  }
  // The label weights of one chunk into la / lt, with the recurrence rows_update applies to a / t.
  void fold_labels(const Tensor& wa, const Tensor& wt, const Tensor& labels, int64_t c0, bool first) {
    const int64_t rows = wa.size(0);
    Tensor pa = take_label(wa, labels, c0);
    Tensor pt = wt.defined() ? take_label(wt, labels, c0) : Tensor();
    if (first) {
      la = pa;
      lt = pt;
      return;
    }
    if (lt.defined()) lt = lt * coef.narrow(0, R, rows) + la * coef.narrow(0, 2 * R, rows) + pt;
    la = la * coef.narrow(0, 0, rows) + pa;
  }
  // a, t: the block's accumulators [rows, D] (t: or undefined); wa, wt: their weights tiles [rows, cols];
  // W: the chunk's weight rows [cols, D] (the GEMM operand: half view or float32); labels: the block's [rows]
  // (or undefined: no label split), c0: the chunk's first vocabulary index.
  void add(Tensor& a, Tensor& t, const Tensor& wa, const Tensor& wt, const Tensor& W, const Tensor& labels,
           int64_t c0, cudaStream_t stream) {
    const int64_t rows = a.size(0);
    const bool first = c0 == 0;
    if (half && labels.defined()) fold_labels(wa, wt, labels, c0, first);
    if (!first && !prod.defined()) prod = at::empty({(t.defined() ? 2 : 1) * R * D}, a.options());
    Tensor pa = first ? a : prod.narrow(0, 0, rows * D).view({rows, D});
    gemm_f32(pa, grad_operand(wa, half, dtype, gbuf), W, false, tmp);
    Tensor pt;
    if (t.defined()) {
      pt = first ? t : prod.narrow(0, R * D, rows * D).view({rows, D});
      gemm_f32(pt, grad_operand(wt, half, dtype, gbuf), W, false, tmp);  // gbuf reused: stream-ordered
    }
    if (first) return;
    const RowCoefs c = coefs();
    rows_update(ptr(a), ptr(t), ptr(pa), ptr(pt), c.sa, c.st, c.ta, rows, D, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // After the block's last chunk, before the normalisation: a += la·W_y, t += lt·W_y (W_y: the labels' rows).
  void finish(Tensor& a, Tensor& t, const Tensor& weight, const Tensor& labels) {
    if (!la.defined()) return;
    Tensor wy = weight.index_select(0, labels.clamp(0, weight.size(0) - 1)).to(at::kFloat);
    a.addcmul_(la.unsqueeze(1), wy);
    if (t.defined()) t.addcmul_(lt.unsqueeze(1), wy);
    la = lt = Tensor();
  }
};

// ---- token_stats --------------------------------------------------------------------------------
// `frozen`: also EA = E_p[(dz/dx)·W] and, with entropy, EC = E_p[(log p + H)·(dz/dx)·W] (float32 [N, D];
// fastpref/_frozen.py) from A = Σ e^{z−m}·(dz/dx)·W and T = Σ e^{z−m}(z − m)·(dz/dx)·W: EA = A/s,
// EC = (T − (t/s)·A)/s.
static std::vector<Tensor> stats_forward_impl(const Tensor& hidden, const Tensor& weight, const OptTensor& bias,
                                              const Tensor& labels, double temperature, double softcap,
                                              bool want_ent, bool want_p2, bool frozen) {
  check_head(hidden, weight, bias, "stats_forward");
  c10::cuda::CUDAGuard guard(hidden.device());
  at::NoTF32Guard ieee;  // float32 GEMMs in IEEE float32 whatever the global TF32 setting (header)
  auto stream = at::cuda::getCurrentCUDAStream().stream();
  const int64_t N = hidden.size(0), D = hidden.size(1), V = weight.size(0);
  const int64_t R = std::min(N, g_rows), C = std::min(V, g_chunk);
  const Transform tr = make_transform(temperature, softcap);
  const auto f32 = hidden.options().dtype(at::kFloat);
  const int64_t* lab = lab_ptr(labels, N);
  Tensor logp = at::empty({N}, f32), lse = at::empty({N}, f32);
  Tensor ent = want_ent ? at::empty({N}, f32) : Tensor(), p2 = want_p2 ? at::empty({N}, f32) : Tensor();
  Tensor m = at::full({N}, -INFINITY, f32), s = at::zeros({N}, f32), zl = at::zeros({N}, f32);
  Tensor t = want_ent ? at::zeros({N}, f32) : Tensor(), s2 = want_p2 ? at::zeros({N}, f32) : Tensor();
  const bool half = half_pair(hidden, weight);
  Tensor ea = frozen ? at::empty({N, D}, f32) : Tensor(), ec = frozen && want_ent ? at::empty({N, D}, f32) : Tensor();
  Tensor twbuf = ec.defined() ? at::empty({R * C}, f32) : Tensor();  // the weights tile of T
  FrozenAcc facc(frozen, half, hidden, R);
  Tensor tilebuf = at::empty({R * C}, f32), hbuf, wbuf, bbuf, tmp;
  for (int64_t r0 = 0; r0 < N; r0 += R) {
    const int64_t rows = std::min(R, N - r0);
    Tensor H = operand_rows(hidden, r0, rows, half, hbuf, R * D);
    Tensor A = frozen ? ea.narrow(0, r0, rows) : Tensor(), T = ec.defined() ? ec.narrow(0, r0, rows) : Tensor();
    const Tensor lab_rows = labels.narrow(0, r0, rows);
    for (int64_t c0 = 0; c0 < V; c0 += C) {
      const int64_t cols = std::min(C, V - c0);
      Tensor W = operand_rows(weight, c0, cols, half, wbuf, C * D);
      const float* bp = f32_vec(bias, c0, cols, bbuf, C);
      Tensor tile = tile_view(tilebuf, rows, cols), tw = T.defined() ? tile_view(twbuf, rows, cols) : Tensor();
      gemm_f32(tile, H, W.t(), false, tmp);
      stats_fwd_tile(tile.data_ptr<float>(), rows, cols, bp, tr, lab + r0, c0, ptr(m) + r0, ptr(s) + r0,
                     want_ent ? ptr(t) + r0 : nullptr, want_p2 ? ptr(s2) + r0 : nullptr, ptr(zl) + r0, ptr(tw),
                     facc.coefs(), stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (frozen) facc.add(A, T, tile, tw, W, lab_rows, c0, stream);
    }
    if (frozen) {  // A ← A/s, T ← T/s − (t/s²)·A
      facc.finish(A, T, weight, lab_rows);
      Tensor inv = s.narrow(0, r0, rows).reciprocal();
      Tensor ta = T.defined() ? t.narrow(0, r0, rows).mul(inv).mul_(inv).neg_() : Tensor();
      rows_update(ptr(A), ptr(T), nullptr, nullptr, ptr(inv), ptr(inv), ptr(ta), rows, D, stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  stats_finish(N, ptr(m), ptr(s), ptr(t), ptr(s2), ptr(zl), ptr(logp), ptr(lse), ptr(ent), ptr(p2), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {logp, lse, ent, p2, ea, ec};
}

std::vector<Tensor> stats_forward(const Tensor& hidden, const Tensor& weight, const OptTensor& bias,
                                  const Tensor& labels, double temperature, double softcap, bool want_ent,
                                  bool want_p2) {
  auto out = stats_forward_impl(hidden, weight, bias, labels, temperature, softcap, want_ent, want_p2, false);
  out.resize(4);
  return out;
}

std::vector<Tensor> stats_forward_frozen(const Tensor& hidden, const Tensor& weight, const OptTensor& bias,
                                         const Tensor& labels, double temperature, double softcap,
                                         bool want_ent, bool want_p2) {
  return stats_forward_impl(hidden, weight, bias, labels, temperature, softcap, want_ent, want_p2, true);
}

// The gradients of one backward: dH (float32 [N, D]) and dW / db (weight / bias dtype), the latter written
// once per vocabulary chunk from float32 chunk accumulators. `half`: the dH/dW products take dL/dx rounded to
// the hidden dtype (see gemm_f32).
struct HeadGrads {
  bool need_h, need_w, need_b, half;
  Tensor dH, dW, db, dwc, dbc, gbuf, tmp;
  HeadGrads(bool nh, bool nw, bool nb, bool half_gemm, const Tensor& hidden, const Tensor& weight,
            const OptTensor& bias, int64_t C)
      : need_h(nh), need_w(nw), need_b(nb && has(bias)), half(half_gemm) {
    const auto f32 = weight.options().dtype(at::kFloat);
    if (need_h) dH = at::zeros({hidden.size(0), hidden.size(1)}, f32);
    if (need_w) {
      dW = at::empty_like(weight);
      dwc = at::empty({C * weight.size(1)}, f32);
    }
    if (need_b) {
      db = at::empty_like(*bias);
      dbc = at::empty({C}, f32);
    }
  }
  // One row block's float32 dL/dx tile [rows, cols] (rows r0 + [0, rows) of the current chunk, whose weight
  // rows are W): dH rows += dx·W, chunk accumulators of dW (dxᵀ·H) and db (Σ_rows dx), set by the first block.
  void add(const Tensor& dx, const Tensor& H, const Tensor& W, int64_t r0, bool first) {
    const int64_t cols = dx.size(1), D = H.size(1);
    const Tensor gx = grad_operand(dx, half, H.scalar_type(), gbuf);
    if (need_h) gemm_f32(dH.narrow(0, r0, dx.size(0)), gx, W, true, tmp);
    if (need_w) gemm_f32(dwc.narrow(0, 0, cols * D).view({cols, D}), gx.t(), H, !first, tmp);
    if (need_b) {
      Tensor p = dbc.narrow(0, 0, cols);
      if (first) at::sum_out(p, dx, {0}); else p.add_(dx.sum(0));
    }
  }
  void finish(int64_t c0, int64_t cols, int64_t D) {
    if (need_w) dW.narrow(0, c0, cols).copy_(dwc.narrow(0, 0, cols * D).view({cols, D}));
    if (need_b) db.narrow(0, c0, cols).copy_(dbc.narrow(0, 0, cols));
  }
  std::vector<Tensor> result() const { return {dH, dW, db}; }
};

std::vector<Tensor> stats_backward(const Tensor& hidden, const Tensor& weight, const OptTensor& bias,
                                   const Tensor& labels, const Tensor& lse, const OptTensor& entropy,
                                   const OptTensor& grad_logp, const OptTensor& grad_lse,
                                   const OptTensor& grad_entropy, double temperature, double softcap, bool need_h,
                                   bool need_w, bool need_b) {
  check_head(hidden, weight, bias, "stats_backward");
  c10::cuda::CUDAGuard guard(hidden.device());
  at::NoTF32Guard ieee;  // float32 GEMMs in IEEE float32 whatever the global TF32 setting (header)
  auto stream = at::cuda::getCurrentCUDAStream().stream();
  const int64_t N = hidden.size(0), D = hidden.size(1), V = weight.size(0);
  const int64_t R = std::min(N, g_rows), C = std::min(V, g_chunk);
  const Transform tr = make_transform(temperature, softcap);
  const auto f32 = hidden.options().dtype(at::kFloat);
  const int64_t* lab = lab_ptr(labels, N);
  const bool ge = has(grad_entropy);
  TORCH_CHECK(!ge || has(entropy), "stats_backward: grad_entropy needs entropy");
  const bool half = half_pair(hidden, weight);
  HeadGrads grads(need_h, need_w, need_b, half, hidden, weight, bias, C);
  Tensor tilebuf = at::empty({R * C}, f32), hbuf, wbuf, bbuf, tmp;
  for (int64_t c0 = 0; c0 < V; c0 += C) {
    const int64_t cols = std::min(C, V - c0);
    Tensor W = operand_rows(weight, c0, cols, half, wbuf, C * D);
    const float* bp = f32_vec(bias, c0, cols, bbuf, C);
    for (int64_t r0 = 0; r0 < N; r0 += R) {
      const int64_t rows = std::min(R, N - r0);
      Tensor H = operand_rows(hidden, r0, rows, half, hbuf, R * D);
      Tensor tile = tile_view(tilebuf, rows, cols);
      gemm_f32(tile, H, W.t(), false, tmp);
      const float* gl = ptr(grad_logp);
      const float* gs = ptr(grad_lse);
      const float* gen = ptr(grad_entropy);
      const float* en = ptr(entropy);
      stats_bwd_tile(tile.data_ptr<float>(), rows, cols, bp, tr, gl ? lab + r0 : nullptr, c0,
                     lse.data_ptr<float>() + r0, ge ? en + r0 : nullptr, gl ? gl + r0 : nullptr,
                     gs ? gs + r0 : nullptr, ge ? gen + r0 : nullptr, stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      grads.add(tile, H, W, r0, r0 == 0);
    }
    grads.finish(c0, cols, D);
  }
  return grads.result();
}

// ---- token_kl -----------------------------------------------------------------------------------
// `frozen` (a policy head whose weight and bias need no gradient): also dkl = ∂KL_row/∂h_row and, with
// labels, EA = E_p[s·W] (float32 [N, D], s = the policy's dz/dx; the spec of kl_forward_frozen in the torch
// backend). Accumulators (epilogue.h, kl_fwd_tile): reverse, a = A = Σ e^{z−m}·s·W and t = B =
// Σ e^{z−m}·(d − μ)·s·W centred on the running mean μ of d = z − rz under p: dkl = B/s, EA = A/s. Forward,
// normalised as they go: a = P = E_p[s·W] = EA and t = D = E_p[s·W] − E_q[s·W] = dkl. The torch
// backend accumulates E_p[s·W] and E_q[s·W] separately; here the difference p − q is formed per entry in
// float32 before the weights are rounded to a half dtype, so a policy close to its reference (p ≈ q) does
// not lose dkl to the rounding of two nearly equal sums.
static std::vector<Tensor> kl_forward_impl(const Tensor& hidden, const Tensor& weight, const OptTensor& bias,
                                           const Tensor& ref_hidden, const Tensor& ref_weight,
                                           const OptTensor& ref_bias, const OptTensor& labels, double temperature,
                                           double softcap, double ref_softcap, bool reverse, bool frozen) {
  check_head(hidden, weight, bias, "kl_forward");
  check_head(ref_hidden, ref_weight, ref_bias, "kl_forward (reference)");
  c10::cuda::CUDAGuard guard(hidden.device());
  at::NoTF32Guard ieee;  // float32 GEMMs in IEEE float32 whatever the global TF32 setting (header)
  auto stream = at::cuda::getCurrentCUDAStream().stream();
  const int64_t N = hidden.size(0), D = hidden.size(1), V = weight.size(0), Dr = ref_hidden.size(1);
  TORCH_CHECK(ref_hidden.size(0) == N && ref_weight.size(0) == V, "kl_forward: reference shapes");
  const int64_t R = std::min(N, g_rows), C = std::min(V, g_chunk);
  const Transform tr = make_transform(temperature, softcap), rtr = make_transform(temperature, ref_softcap);
  const auto f32 = hidden.options().dtype(at::kFloat);
  const int64_t* lab = lab_ptr(labels, N);
  Tensor kl = at::empty({N}, f32), lse = at::empty({N}, f32), rlse = at::empty({N}, f32);
  Tensor logp = lab ? at::empty({N}, f32) : Tensor(), rlogp = lab ? at::empty({N}, f32) : Tensor();
  Tensor m = at::full({N}, -INFINITY, f32), rm = at::full({N}, -INFINITY, f32);
  Tensor st = at::zeros({5, N}, f32);  // s, rs, cross, zl, rzl
  float *s = ptr(st), *rs = s + N, *cross = s + 2 * N, *zl = s + 3 * N, *rzl = s + 4 * N;
  const bool half = half_pair(hidden, weight), rhalf = half_pair(ref_hidden, ref_weight);
  Tensor dkl = frozen ? at::empty({N, D}, f32) : Tensor(), ea = frozen && lab ? at::empty({N, D}, f32) : Tensor();
  Tensor abuf = frozen && !lab ? at::empty({R * D}, f32) : Tensor();  // A of a row block when EA is not returned
  FrozenAcc facc(frozen, half, hidden, R);
  Tensor zbuf = at::empty({R * C}, f32), rzbuf = at::empty({R * C}, f32);
  Tensor hbuf, rhbuf, wbuf, rwbuf, bbuf, rbbuf, tmp;
  for (int64_t r0 = 0; r0 < N; r0 += R) {
    const int64_t rows = std::min(R, N - r0);
    Tensor H = operand_rows(hidden, r0, rows, half, hbuf, R * D);
    Tensor RH = operand_rows(ref_hidden, r0, rows, rhalf, rhbuf, R * Dr);
    Tensor A = !frozen ? Tensor() : lab ? ea.narrow(0, r0, rows) : tile_view(abuf, rows, D);
    Tensor T = frozen ? dkl.narrow(0, r0, rows) : Tensor();  // D (forward) or B (reverse), then dkl in place
    const Tensor lab_rows = lab ? labels->narrow(0, r0, rows) : Tensor();
    for (int64_t c0 = 0; c0 < V; c0 += C) {
      const int64_t cols = std::min(C, V - c0);
      Tensor W = operand_rows(weight, c0, cols, half, wbuf, C * D);
      Tensor RW = operand_rows(ref_weight, c0, cols, rhalf, rwbuf, C * Dr);
      const float* bp = f32_vec(bias, c0, cols, bbuf, C);
      const float* rbp = f32_vec(ref_bias, c0, cols, rbbuf, C);
      Tensor zt = tile_view(zbuf, rows, cols), rzt = tile_view(rzbuf, rows, cols);
      gemm_f32(zt, H, W.t(), false, tmp);
      gemm_f32(rzt, RH, RW.t(), false, tmp);
      kl_fwd_tile(zt.data_ptr<float>(), rzt.data_ptr<float>(), rows, cols, bp, rbp, tr, rtr, lab ? lab + r0 : nullptr,
                  c0, reverse ? 1 : 0, ptr(m) + r0, s + r0, ptr(rm) + r0, rs + r0, cross + r0, zl + r0, rzl + r0,
                  facc.coefs(), stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (frozen) {  // the weights of a: z (reverse) or rz (forward); of t: the other tile
        if (reverse) facc.add(A, T, zt, rzt, W, lab_rows, c0, stream);
        else facc.add(A, T, rzt, zt, W, lab_rows, c0, stream);
      }
    }
    if (frozen) facc.finish(A, T, weight, lab_rows);
    if (frozen && reverse) {  // dkl = B/s, EA = A/s
      Tensor inv = st.select(0, 0).narrow(0, r0, rows).reciprocal();
      rows_update(ptr(A), ptr(T), nullptr, nullptr, ptr(inv), ptr(inv), nullptr, rows, D, stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }  // forward: dkl = D and EA = P as they are
  }
  kl_finish(N, reverse ? 1 : 0, ptr(m), s, ptr(rm), rs, cross, zl, rzl, ptr(kl), ptr(lse), ptr(rlse), ptr(logp),
            ptr(rlogp), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {kl, lse, rlse, logp, rlogp, dkl, ea};
}

std::vector<Tensor> kl_forward(const Tensor& hidden, const Tensor& weight, const OptTensor& bias,
                               const Tensor& ref_hidden, const Tensor& ref_weight, const OptTensor& ref_bias,
                               const OptTensor& labels, double temperature, double softcap, double ref_softcap,
                               bool reverse) {
  auto out = kl_forward_impl(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, temperature, softcap,
                             ref_softcap, reverse, false);
  out.resize(5);
  return out;
}

// -> [kl, lse, rlse, logp, rlogp, dkl, ea] (logp, rlogp, ea: None without labels)
std::vector<Tensor> kl_forward_frozen(const Tensor& hidden, const Tensor& weight, const OptTensor& bias,
                                      const Tensor& ref_hidden, const Tensor& ref_weight, const OptTensor& ref_bias,
                                      const OptTensor& labels, double temperature, double softcap,
                                      double ref_softcap, bool reverse) {
  return kl_forward_impl(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, temperature, softcap,
                         ref_softcap, reverse, true);
}

std::vector<Tensor> kl_backward(const Tensor& hidden, const Tensor& weight, const OptTensor& bias,
                                const Tensor& ref_hidden, const Tensor& ref_weight, const OptTensor& ref_bias,
                                const OptTensor& labels, const Tensor& lse, const Tensor& ref_lse, const Tensor& kl,
                                const OptTensor& grad_kl, const OptTensor& grad_logp, double temperature,
                                double softcap, double ref_softcap, bool reverse, bool need_h, bool need_w,
                                bool need_b) {
  check_head(hidden, weight, bias, "kl_backward");
  check_head(ref_hidden, ref_weight, ref_bias, "kl_backward (reference)");
  c10::cuda::CUDAGuard guard(hidden.device());
  at::NoTF32Guard ieee;  // float32 GEMMs in IEEE float32 whatever the global TF32 setting (header)
  auto stream = at::cuda::getCurrentCUDAStream().stream();
  const int64_t N = hidden.size(0), D = hidden.size(1), V = weight.size(0), Dr = ref_hidden.size(1);
  const int64_t R = std::min(N, g_rows), C = std::min(V, g_chunk);
  const Transform tr = make_transform(temperature, softcap), rtr = make_transform(temperature, ref_softcap);
  const auto f32 = hidden.options().dtype(at::kFloat);
  const int64_t* lab = lab_ptr(labels, N);
  const float* gl = lab ? ptr(grad_logp) : nullptr;
  const float* gk = ptr(grad_kl);
  const bool half = half_pair(hidden, weight), rhalf = half_pair(ref_hidden, ref_weight);
  HeadGrads grads(need_h, need_w, need_b, half, hidden, weight, bias, C);
  Tensor zbuf = at::empty({R * C}, f32), rzbuf = at::empty({R * C}, f32);
  Tensor hbuf, rhbuf, wbuf, rwbuf, bbuf, rbbuf, tmp;
  for (int64_t c0 = 0; c0 < V; c0 += C) {
    const int64_t cols = std::min(C, V - c0);
    Tensor W = operand_rows(weight, c0, cols, half, wbuf, C * D);
    Tensor RW = operand_rows(ref_weight, c0, cols, rhalf, rwbuf, C * Dr);
    const float* bp = f32_vec(bias, c0, cols, bbuf, C);
    const float* rbp = f32_vec(ref_bias, c0, cols, rbbuf, C);
    for (int64_t r0 = 0; r0 < N; r0 += R) {
      const int64_t rows = std::min(R, N - r0);
      Tensor H = operand_rows(hidden, r0, rows, half, hbuf, R * D);
      Tensor RH = operand_rows(ref_hidden, r0, rows, rhalf, rhbuf, R * Dr);
      Tensor zt = tile_view(zbuf, rows, cols), rzt = tile_view(rzbuf, rows, cols);
      gemm_f32(zt, H, W.t(), false, tmp);
      gemm_f32(rzt, RH, RW.t(), false, tmp);
      kl_bwd_tile(zt.data_ptr<float>(), rzt.data_ptr<float>(), rows, cols, bp, rbp, tr, rtr,
                  gl ? lab + r0 : nullptr, c0, reverse ? 1 : 0, lse.data_ptr<float>() + r0,
                  ref_lse.data_ptr<float>() + r0, kl.data_ptr<float>() + r0, gk ? gk + r0 : nullptr,
                  gl ? gl + r0 : nullptr, stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      grads.add(zt, H, W, r0, r0 == 0);
    }
    grads.finish(c0, cols, D);
  }
  return grads.result();
}

}  // namespace fastpref_cuda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace fastpref_cuda;
  m.doc() = "fastpref native CUDA kernels (cuBLAS GEMM through ATen + fused epilogue kernels)";
  m.def("stats_forward", &stats_forward);
  m.def("stats_forward_frozen", &stats_forward_frozen);
  m.def("stats_backward", &stats_backward);
  m.def("kl_forward", &kl_forward);
  m.def("kl_forward_frozen", &kl_forward_frozen);
  m.def("kl_backward", &kl_backward);
  m.def("set_tiling", [](int64_t rows, int64_t chunk) {
    TORCH_CHECK(rows >= 1 && chunk >= 1, "set_tiling: sizes must be >= 1");
    g_rows = rows;
    g_chunk = chunk;
  });
  m.def("get_tiling", []() { return std::make_pair(g_rows, g_chunk); });
  m.def("kernel_image_error", [](int64_t device) {
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    const cudaError_t err = kernel_image_status();
    return err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
  }, "'' when CUDA device `device` can run this build's kernels, else the CUDA error (no kernel image, ...)");
}
