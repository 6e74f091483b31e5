// fastpref._native_cpu: token_stats and token_kl on CPU tensors, vocabulary-chunked.
//
// One algorithm for every op. Rows are split into blocks of R rows and the vocabulary into chunks of C
// entries; a logits tile [R, C] = H_block · W_chunkᵀ comes from a float32 GEMM through ATen (MKL/OpenBLAS),
// then a fused per-row pass (rowmath.cpp) applies bias, softcap and 1/T and folds the tile into running
// per-row accumulators (max m, Σe^{z−m}, Σe^{z−m}(z−m) for the entropy, Σe^{2(z−m)} for log Σp², the KL
// cross term, the label logit). The backward recomputes each tile, turns it into dL/dx in place, and feeds
// it to two GEMMs: dH_block += dx · W_chunk (float32 [N, D] accumulator) and dW_chunk += dxᵀ · H_block.
//
// Threads: blocks of rows are spread over at::parallel_for threads and every thread runs its own
// single-threaded GEMMs on its own tiles (ATen runs BLAS sequentially inside a parallel region). On small
// CPUs this is markedly faster than one multi-threaded GEMM per tile, and the tile stays in the cache of
// the core that made it. The forward loops row blocks (outer) × chunks (inner) with no synchronisation;
// the backward loops chunks (outer) × row blocks (inner, parallel): rows of dH belong to one thread, and
// each thread accumulates its own float32 dW/db partial for the chunk, summed and written once per chunk.
//
// Scratch memory (float32 elements), with T threads, R rows, C vocabulary entries per tile, D (and D_ref
// for the reference model of token_kl, else 0; D_kl = D for token_kl, else 0):
//     T · (2·R·C + R·(D + D_ref + D_kl) + C·(2·D + D_ref) + 3·C)
// — logits tiles (two for token_kl; the frozen-head forwards turn them into weights tiles in place),
// float32 copies of a hidden block / weight chunk / bias chunk (only for inputs that are not float32), the
// dW/db partials of the backward, the E_p[s·W] accumulator of token_kl's frozen forward without labels
// (D_kl). It does not grow with V or N.
// The backward also returns a float32 [N, D] dH accumulator and allocates dW [V, D] / db [V] in the
// weight's dtype: the gradients themselves. scratch_bound_bytes() evaluates the formula and
// last_scratch_bytes() reports what the last call allocated (tests check one against the other).
//
// Dtypes: float32, float16 and bfloat16 inputs (non-float32 blocks are upcast to float32 scratch before
// each GEMM, so GEMMs and accumulation are float32 as in the torch backend); float64 is rejected by the
// Python wrapper (supports()).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "rowmath.h"

namespace fastpref_cpu {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;

// Default tile: 1024 rows × 2048 vocabulary entries = 8 MiB of float32 per thread (L3 resident; each
// thread's single-threaded GEMMs with K = D, K = C and K = R run near one core's BLAS peak at these sizes,
// and a row of the tile, 8 KiB, stays in L1 through the two epilogue passes). set_tiling() overrides.
static int64_t g_rows = 1024;
static int64_t g_chunk = 2048;
static std::atomic<int64_t> g_last_scratch{0};

struct Tiling {
  int64_t rows, chunk, blocks, threads;
};

static Tiling tiling(int64_t N, int64_t V) {
  int64_t T = std::max<int64_t>(1, at::get_num_threads());
  int64_t chunk = std::min(V, g_chunk);
  // At least one block per thread when N is small; multiples of 8 rows keep the GEMMs aligned.
  int64_t per_thread = (N + T - 1) / T;
  per_thread = (per_thread + 7) / 8 * 8;
  int64_t rows = std::max<int64_t>(1, std::min(g_rows, per_thread));
  return {rows, chunk, (N + rows - 1) / rows, T};
}

// Dr > 0 means token_kl, whose frozen forward without labels adds an [R, D] accumulator per thread.
int64_t scratch_bound_elems(int64_t T, int64_t R, int64_t C, int64_t D, int64_t Dr) {
  const int64_t Dk = Dr > 0 ? D : 0;
  return T * (2 * R * C + R * (D + Dr + Dk) + C * (2 * D + Dr) + 3 * C);
}

// Scratch allocations of one call, counted so that tests can compare them with the documented bound.
struct Counter {
  std::atomic<int64_t> bytes{0};
  Tensor alloc(int64_t n, const at::TensorOptions& o) {
    bytes += n * 4;
    return at::empty({n}, o.dtype(at::kFloat));
  }
};

static Transform make_transform(double temperature, double softcap) {
  Transform tr;
  tr.softcap = softcap > 0;
  tr.inv_t = static_cast<float>(1.0 / temperature);
  tr.inv_cap = tr.softcap ? static_cast<float>(1.0 / softcap) : 0.f;
  tr.cap_t = tr.softcap ? static_cast<float>(softcap / temperature) : 0.f;
  return tr;
}

// Rows [r0, r0 + n) of a 2-D tensor as float32: a view when it is float32, else a copy into buf
// (allocated on first use with `cap` elements).
static Tensor f32_rows(const Tensor& x, int64_t r0, int64_t n, Tensor& buf, int64_t cap, Counter& cnt) {
  Tensor s = x.narrow(0, r0, n);
  if (x.scalar_type() == at::kFloat) return s;
  if (!buf.defined()) buf = cnt.alloc(cap, x.options());
  Tensor out = buf.narrow(0, 0, n * x.size(1)).view({n, x.size(1)});
  out.copy_(s);
  return out;
}

static const float* f32_vec(const OptTensor& b, int64_t c0, int64_t n, Tensor& buf, int64_t cap, Counter& cnt) {
  if (!b.has_value() || !b->defined()) return nullptr;
  if (b->scalar_type() == at::kFloat) return b->data_ptr<float>() + c0;
  if (!buf.defined()) buf = cnt.alloc(cap, b->options());
  Tensor out = buf.narrow(0, 0, n);
  out.copy_(b->narrow(0, c0, n));
  return out.data_ptr<float>();
}

static const float* ptr_or_null(const OptTensor& t) {
  return (t.has_value() && t->defined()) ? t->data_ptr<float>() : nullptr;
}

// float64 is refused for the policy (whose dtype the dispatcher checks); a float64 reference is read
// through float32 copies like the other non-float32 dtypes, as the torch backend does.
static void check_inputs(const Tensor& h, const Tensor& w, const OptTensor& b, const char* who,
                         bool allow_double = false) {
  TORCH_CHECK(h.device().is_cpu() && w.device().is_cpu(), who, ": the CPU module needs CPU tensors");
  TORCH_CHECK(h.dim() == 2 && w.dim() == 2 && h.size(1) == w.size(1), who, ": hidden [N, D] and weight [V, D]");
  TORCH_CHECK(h.is_contiguous() && w.is_contiguous(), who, ": hidden and weight must be contiguous");
  TORCH_CHECK(allow_double || (h.scalar_type() != at::kDouble && w.scalar_type() != at::kDouble), who,
              ": float64 is not supported by the native backend");
  if (b.has_value() && b->defined())
    TORCH_CHECK(b->dim() == 1 && b->size(0) == w.size(0) && b->is_contiguous(), who, ": bias must be [V]");
}

static void check_f32_vec(const OptTensor& t, int64_t N, const char* what) {
  if (t.has_value() && t->defined())
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->numel() == N && t->is_contiguous(), what,
                " must be a contiguous float32 [N] tensor");
}

// ---------------------------------------------------------------------------------------------------
// token_stats
// ---------------------------------------------------------------------------------------------------
// With `frozen` (a head whose weight and bias need no gradient) the forward also returns
// EA = E_p[(dz/dx)·W] and, with entropy, EC = E_p[(log p + H)·(dz/dx)·W] (float32 [N, D]; fastpref/_frozen.py):
// per row, A = Σ e^{z−m}·(dz/dx)·W and T = Σ e^{z−m}(z − m)·(dz/dx)·W are rescaled with the running max and
// fed by one extra GEMM per tile each (weights tile [rows, cols] · W chunk [cols, D]).
static std::vector<Tensor> stats_forward_impl(const Tensor& hidden, const Tensor& weight, const OptTensor& bias,
                                              const Tensor& labels, double temperature, double softcap,
                                              bool want_ent, bool want_p2, bool frozen) {
  check_inputs(hidden, weight, bias, "stats_forward");
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.is_contiguous() && labels.numel() == hidden.size(0),
              "stats_forward: labels must be contiguous int64 [N]");
  const int64_t N = hidden.size(0), D = hidden.size(1), V = weight.size(0);
  const Transform tr = make_transform(temperature, softcap);
  const auto f32 = hidden.options().dtype(at::kFloat);
  Tensor logp = at::empty({N}, f32), lse = at::empty({N}, f32);
  Tensor ent = want_ent ? at::empty({N}, f32) : Tensor();
  Tensor p2 = want_p2 ? at::empty({N}, f32) : Tensor();
  Tensor ea = frozen ? at::zeros({N, D}, f32) : Tensor();
  Tensor ec = (frozen && want_ent) ? at::zeros({N, D}, f32) : Tensor();
  const Tiling tl = tiling(N, V);
  const int64_t R = tl.rows, C = tl.chunk;
  const int64_t* lab = labels.data_ptr<int64_t>();
  float* o_logp = logp.data_ptr<float>();
  float* o_lse = lse.data_ptr<float>();
  float* o_ent = want_ent ? ent.data_ptr<float>() : nullptr;
  float* o_p2 = want_p2 ? p2.data_ptr<float>() : nullptr;
  Counter cnt;

  at::parallel_for(0, tl.blocks, 1, [&](int64_t b0, int64_t b1) {
    Tensor tilebuf = cnt.alloc(R * C, f32), hbuf, wbuf, bbuf;
    Tensor tile2buf = (frozen && want_ent) ? cnt.alloc(R * C, f32) : Tensor();
    std::vector<float> m(R), s(R), t(R), s2(R), zl(R);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * R, rows = std::min(R, N - r0);
      Tensor H = f32_rows(hidden, r0, rows, hbuf, R * D, cnt);
      Tensor A = frozen ? ea.narrow(0, r0, rows) : Tensor();
      Tensor Tz = (frozen && want_ent) ? ec.narrow(0, r0, rows) : Tensor();
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(s.begin(), s.end(), 0.f);
      std::fill(t.begin(), t.end(), 0.f);
      std::fill(s2.begin(), s2.end(), 0.f);
      std::fill(zl.begin(), zl.end(), 0.f);
      for (int64_t c0 = 0; c0 < V; c0 += C) {
        const int64_t cols = std::min(C, V - c0);
        Tensor W = f32_rows(weight, c0, cols, wbuf, C * D, cnt);
        const float* bp = f32_vec(bias, c0, cols, bbuf, C, cnt);
        Tensor tile = tilebuf.narrow(0, 0, rows * cols).view({rows, cols});
        at::mm_out(tile, H, W.t());
        float* tp = tile.data_ptr<float>();
        for (int64_t i = 0; i < rows; ++i) {
          float* x = tp + i * cols;
          const float mx = transform_row(x, bp, cols, tr);
          const int64_t l = lab[r0 + i] - c0;
          if (l >= 0 && l < cols) zl[i] += x[l];
          const float mo = m[i], mn = std::max(mo, mx);
          const float shift = std::isinf(mo) ? 0.f : mo - mn;  // ≤ 0
          const float sc = std::exp(shift);
          const RowSums r = exp_sums_row(x, cols, mn, want_ent, want_p2);
          if (want_ent) t[i] = (t[i] + shift * s[i]) * sc + r.t;
          if (want_p2) s2[i] = s2[i] * sc * sc + r.s2;
          s[i] = s[i] * sc + r.s;
          m[i] = mn;
          if (frozen) {
            float* a = A.data_ptr<float>() + i * D;
            if (want_ent) {
              float* tz = Tz.data_ptr<float>() + i * D;
              for (int64_t d = 0; d < D; ++d) tz[d] = (tz[d] + shift * a[d]) * sc;
            }
            for (int64_t d = 0; d < D; ++d) a[d] *= sc;
            frozen_weights_row(x, want_ent ? tile2buf.data_ptr<float>() + i * cols : nullptr, cols, mn, tr);
          }
        }
        if (frozen) {
          A.addmm_(tile, W);
          if (want_ent) Tz.addmm_(tile2buf.narrow(0, 0, rows * cols).view({rows, cols}), W);
        }
      }
      for (int64_t i = 0; i < rows; ++i) {
        const float ls = std::log(s[i]), L = m[i] + ls;
        o_lse[r0 + i] = L;
        o_logp[r0 + i] = zl[i] - L;
        if (want_ent) o_ent[r0 + i] = ls - t[i] / s[i];
        if (want_p2) o_p2[r0 + i] = std::log(s2[i]) - 2.f * ls;
        if (frozen) {  // EA = A/s, EC = (T − (t/s)·A)/s
          float* a = A.data_ptr<float>() + i * D;
          const float inv = 1.f / s[i];
          if (want_ent) {
            float* tz = Tz.data_ptr<float>() + i * D;
            const float mean = t[i] * inv;
            for (int64_t d = 0; d < D; ++d) tz[d] = (tz[d] - mean * a[d]) * inv;
          }
          for (int64_t d = 0; d < D; ++d) a[d] *= inv;
        }
      }
    }
  });
  g_last_scratch = cnt.bytes.load();
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

// The gradients of one backward: dH (float32 [N, D]; its rows belong to the thread of their block) and
// dW / db from per-chunk float32 partials, one per thread, summed into the outputs once per chunk.
struct HeadGrads {
  bool need_h, need_w, need_b;
  Tensor dH, dW, db;  // outputs (float32 / weight / bias dtype), or undefined
  std::vector<Tensor> dwp, dbp;
  std::vector<char> used;
  HeadGrads(int64_t T, bool nh, bool nw, bool nb, const Tensor& hidden, const Tensor& weight, const OptTensor& bias)
      : need_h(nh), need_w(nw), need_b(nb && bias.has_value() && bias->defined()), dwp(T), dbp(T), used(T, 0) {
    if (need_h) dH = at::zeros({hidden.size(0), hidden.size(1)}, hidden.options().dtype(at::kFloat));
    if (need_w) dW = at::empty_like(weight);
    if (need_b) db = at::empty_like(*bias);
  }
  void start() { std::fill(used.begin(), used.end(), 0); }
  // After the dx tile [rows, cols] of rows r0 + [0, rows) is ready (W: the chunk's weight rows):
  // dH rows += dx·W, dW partial += dxᵀ·H, db partial += Σ_rows dx.
  void add(int tid, const Tensor& tile, const Tensor& H, const Tensor& W, int64_t r0, int64_t C, Counter& cnt) {
    const int64_t rows = tile.size(0), cols = tile.size(1), D = H.size(1);
    const bool first = !used[tid];
    if (need_h) dH.narrow(0, r0, rows).addmm_(tile, W);
    if (need_w) {
      if (!dwp[tid].defined()) dwp[tid] = cnt.alloc(C * D, tile.options());
      Tensor p = dwp[tid].narrow(0, 0, cols * D).view({cols, D});
      if (first)
        at::mm_out(p, tile.t(), H);
      else
        p.addmm_(tile.t(), H);
    }
    if (need_b) {
      if (!dbp[tid].defined()) dbp[tid] = cnt.alloc(C, tile.options());
      float* acc = dbp[tid].data_ptr<float>();
      const float* x = tile.data_ptr<float>();
      if (first) std::fill(acc, acc + cols, 0.f);
      for (int64_t i = 0; i < rows; ++i) {
        const float* xi = x + i * cols;
#pragma omp simd
        for (int64_t j = 0; j < cols; ++j) acc[j] += xi[j];
      }
    }
    used[tid] = 1;
  }
  void finish(int64_t c0, int64_t cols, int64_t D) {
    Tensor w_acc, b_acc;
    for (size_t k = 0; k < used.size(); ++k) {
      if (!used[k]) continue;
      if (need_w) {
        Tensor p = dwp[k].narrow(0, 0, cols * D).view({cols, D});
        if (w_acc.defined()) w_acc.add_(p); else w_acc = p;
      }
      if (need_b) {
        Tensor p = dbp[k].narrow(0, 0, cols);
        if (b_acc.defined()) b_acc.add_(p); else b_acc = p;
      }
    }
    if (need_w) dW.narrow(0, c0, cols).copy_(w_acc);
    if (need_b) db.narrow(0, c0, cols).copy_(b_acc);
  }
};

std::vector<Tensor> stats_backward(const Tensor& hidden, const Tensor& weight, const OptTensor& bias,
                                   const Tensor& labels, const Tensor& lse, const OptTensor& entropy,
                                   const OptTensor& grad_logp, const OptTensor& grad_lse,
                                   const OptTensor& grad_entropy, double temperature, double softcap,
                                   bool need_h, bool need_w, bool need_b) {
  check_inputs(hidden, weight, bias, "stats_backward");
  const int64_t N = hidden.size(0), D = hidden.size(1), V = weight.size(0);
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.is_contiguous() && labels.numel() == N,
              "stats_backward: labels must be contiguous int64 [N]");
  check_f32_vec(lse, N, "lse");
  check_f32_vec(entropy, N, "entropy");
  check_f32_vec(grad_logp, N, "grad_logp");
  check_f32_vec(grad_lse, N, "grad_lse");
  check_f32_vec(grad_entropy, N, "grad_entropy");
  TORCH_CHECK(!(grad_entropy.has_value() && grad_entropy->defined()) || (entropy.has_value() && entropy->defined()),
              "stats_backward: grad_entropy needs entropy");
  const Transform tr = make_transform(temperature, softcap);
  const auto f32 = hidden.options().dtype(at::kFloat);
  const Tiling tl = tiling(N, V);
  const int64_t R = tl.rows, C = tl.chunk, T = tl.threads;
  const int64_t* lab = labels.data_ptr<int64_t>();
  const float* p_lse = lse.data_ptr<float>();
  const float* p_ent = ptr_or_null(entropy);
  const float* g_logp = ptr_or_null(grad_logp);
  const float* g_lse = ptr_or_null(grad_lse);
  const float* g_ent = ptr_or_null(grad_entropy);
  Counter cnt;
  HeadGrads grads(T, need_h, need_w, need_b, hidden, weight, bias);
  std::vector<Tensor> tiles(T), hbufs(T);
  Tensor wbuf, bbuf;

  for (int64_t c0 = 0; c0 < V; c0 += C) {
    const int64_t cols = std::min(C, V - c0);
    const Tensor W = f32_rows(weight, c0, cols, wbuf, C * D, cnt);
    const float* bp = f32_vec(bias, c0, cols, bbuf, C, cnt);
    grads.start();
    at::parallel_for(0, tl.blocks, 1, [&](int64_t b0, int64_t b1) {
      const int tid = at::get_thread_num();
      if (!tiles[tid].defined()) tiles[tid] = cnt.alloc(R * C, f32);
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t r0 = blk * R, rows = std::min(R, N - r0);
        Tensor H = f32_rows(hidden, r0, rows, hbufs[tid], R * D, cnt);
        Tensor tile = tiles[tid].narrow(0, 0, rows * cols).view({rows, cols});
        at::mm_out(tile, H, W.t());
        float* tp = tile.data_ptr<float>();
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t g = r0 + i;
          float* x = tp + i * cols;
          const int64_t l = lab[g] - c0;
          const bool inside = g_logp != nullptr && l >= 0 && l < cols;
          const float raw_l = inside ? x[l] + (bp ? bp[l] : 0.f) : 0.f;
          const float gl = g_logp ? g_logp[g] : 0.f;
          const float coef = (g_lse ? g_lse[g] : 0.f) - gl;
          stats_grad_row(x, bp, cols, tr, p_lse[g], coef, g_ent ? g_ent[g] : 0.f, p_ent ? p_ent[g] : 0.f);
          if (inside) x[l] += gl * dzdx_at(raw_l, tr);
        }
        grads.add(tid, tile, H, W, r0, C, cnt);
      }
    });
    grads.finish(c0, cols, D);
  }
  g_last_scratch = cnt.bytes.load();
  return {grads.dH, grads.dW, grads.db};
}

// ---------------------------------------------------------------------------------------------------
// token_kl
// ---------------------------------------------------------------------------------------------------
// With `frozen` (a policy head whose weight and bias need no gradient) the forward also returns, float32
// [N, D] (fastpref._frozen.kl_hidden_grad), with s = dz/dx of the policy, p / q the policy / reference softmax:
//     dkl = ∂KL/∂h:  forward  E_p[s·W] − E_q[s·W];   reverse  E_p[(d − μ)·s·W], d = z − rz, μ = E_p[d]
//     ea  = E_p[s·W]  (with labels only)
// Per row, rescaled with the running maxima: A = Σ e^{z−m}·s·W; forward O = Σ e^{rz−rm}·s·W; reverse the
// centred O = Σ e^{z−m}·(d − μ_run)·s·W with μ_run = cross/Σe^{z−m} the running mean of d: when μ_run moves,
// O += (μ_old − μ_new)·A. (Centring keeps float32 exact at |z| ≈ 1e4, where E_p[d·s·W] − μ·E_p[s·W] cancels.)
// The two weights tiles overwrite the logits tiles in place (kl_frozen_weights_row) and feed one GEMM each
// with the W chunk. A lives in `ea` with labels, else in a per-thread [R, D] scratch block; O lives in `dkl`.
static std::vector<Tensor> kl_forward_impl(const Tensor& hidden, const Tensor& weight, const OptTensor& bias,
                                           const Tensor& ref_hidden, const Tensor& ref_weight,
                                           const OptTensor& ref_bias, const OptTensor& labels, double temperature,
                                           double softcap, double ref_softcap, bool reverse, bool frozen) {
  check_inputs(hidden, weight, bias, "kl_forward");
  check_inputs(ref_hidden, ref_weight, ref_bias, "kl_forward (reference)", true);
  const int64_t N = hidden.size(0), D = hidden.size(1), V = weight.size(0), Dr = ref_hidden.size(1);
  TORCH_CHECK(ref_hidden.size(0) == N && ref_weight.size(0) == V, "kl_forward: shapes of the reference");
  const bool has_lab = labels.has_value() && labels->defined();
  if (has_lab)
    TORCH_CHECK(labels->scalar_type() == at::kLong && labels->is_contiguous() && labels->numel() == N,
                "kl_forward: labels must be contiguous int64 [N]");
  const Transform tr = make_transform(temperature, softcap), rtr = make_transform(temperature, ref_softcap);
  const auto f32 = hidden.options().dtype(at::kFloat);
  Tensor kl = at::empty({N}, f32), lse = at::empty({N}, f32), rlse = at::empty({N}, f32);
  Tensor logp = has_lab ? at::empty({N}, f32) : Tensor(), rlogp = has_lab ? at::empty({N}, f32) : Tensor();
  Tensor dkl = frozen ? at::zeros({N, D}, f32) : Tensor();
  Tensor ea = (frozen && has_lab) ? at::zeros({N, D}, f32) : Tensor();
  const Tiling tl = tiling(N, V);
  const int64_t R = tl.rows, C = tl.chunk;
  const int64_t* lab = has_lab ? labels->data_ptr<int64_t>() : nullptr;
  float *o_kl = kl.data_ptr<float>(), *o_lse = lse.data_ptr<float>(), *o_rlse = rlse.data_ptr<float>();
  float* o_logp = has_lab ? logp.data_ptr<float>() : nullptr;
  float* o_rlogp = has_lab ? rlogp.data_ptr<float>() : nullptr;
  Counter cnt;
  const float ninf = -std::numeric_limits<float>::infinity();

  at::parallel_for(0, tl.blocks, 1, [&](int64_t b0, int64_t b1) {
    Tensor zbuf = cnt.alloc(R * C, f32), rzbuf = cnt.alloc(R * C, f32);
    Tensor abuf = (frozen && !has_lab) ? cnt.alloc(R * D, f32) : Tensor();
    Tensor hbuf, rhbuf, wbuf, rwbuf, bbuf, rbbuf;
    std::vector<float> m(R), s(R), rm(R), rs(R), cross(R), zl(R), rzl(R), mu(R);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * R, rows = std::min(R, N - r0);
      Tensor H = f32_rows(hidden, r0, rows, hbuf, R * D, cnt);
      Tensor RH = f32_rows(ref_hidden, r0, rows, rhbuf, R * Dr, cnt);
      Tensor A, O;  // [rows, D]: Σ e^{z−m}·s·W, and the forward's Σ e^{rz−rm}·s·W or the reverse's centred sum
      if (frozen) {
        A = has_lab ? ea.narrow(0, r0, rows) : abuf.narrow(0, 0, rows * D).view({rows, D}).zero_();
        O = dkl.narrow(0, r0, rows);
      }
      std::fill(m.begin(), m.end(), ninf);
      std::fill(rm.begin(), rm.end(), ninf);
      for (auto* v : {&s, &rs, &cross, &zl, &rzl, &mu}) std::fill(v->begin(), v->end(), 0.f);
      for (int64_t c0 = 0; c0 < V; c0 += C) {
        const int64_t cols = std::min(C, V - c0);
        Tensor W = f32_rows(weight, c0, cols, wbuf, C * D, cnt);
        Tensor RW = f32_rows(ref_weight, c0, cols, rwbuf, C * Dr, cnt);
        const float* bp = f32_vec(bias, c0, cols, bbuf, C, cnt);
        const float* rbp = f32_vec(ref_bias, c0, cols, rbbuf, C, cnt);
        Tensor zt = zbuf.narrow(0, 0, rows * cols).view({rows, cols});
        Tensor rzt = rzbuf.narrow(0, 0, rows * cols).view({rows, cols});
        at::mm_out(zt, H, W.t());
        at::mm_out(rzt, RH, RW.t());
        float *zp = zt.data_ptr<float>(), *rzp = rzt.data_ptr<float>();
        for (int64_t i = 0; i < rows; ++i) {
          float *z = zp + i * cols, *rz = rzp + i * cols;
          const float mx = transform_row(z, bp, cols, tr), rmx = transform_row(rz, rbp, cols, rtr);
          if (has_lab) {
            const int64_t l = lab[r0 + i] - c0;
            if (l >= 0 && l < cols) {
              zl[i] += z[l];
              rzl[i] += rz[l];
            }
          }
          const float mo = m[i], mn = std::max(mo, mx), rmo = rm[i], rmn = std::max(rmo, rmx);
          const float sc = std::isinf(mo) ? 1.f : std::exp(mo - mn);
          const float rsc = std::isinf(rmo) ? 1.f : std::exp(rmo - rmn);
          float se, rse, c;
          if (!reverse) {  // weights: the reference's softmax
            c = cross_row(rz, z, cols, rmn, &rse);
            se = exp_sums_row(z, cols, mn, false, false).s;
            cross[i] = cross[i] * rsc + c;
          } else {
            c = cross_row(z, rz, cols, mn, &se);
            rse = exp_sums_row(rz, cols, rmn, false, false).s;
            cross[i] = cross[i] * sc + c;
          }
          s[i] = s[i] * sc + se;
          rs[i] = rs[i] * rsc + rse;
          m[i] = mn;
          rm[i] = rmn;
          if (frozen) {
            float *a = A.data_ptr<float>() + i * D, *o = O.data_ptr<float>() + i * D;
            if (!reverse) {
              for (int64_t d = 0; d < D; ++d) {
                a[d] *= sc;
                o[d] *= rsc;
              }
            } else {  // O ← sc·O + (μ_old − μ_new)·(sc·A): centred on the new running mean
              const float mu_new = s[i] > 0.f ? cross[i] / s[i] : 0.f, shift = mu[i] - mu_new;
              for (int64_t d = 0; d < D; ++d) {
                const float ad = a[d] * sc;
                o[d] = o[d] * sc + shift * ad;
                a[d] = ad;
              }
              mu[i] = mu_new;
            }
            kl_frozen_weights_row(z, rz, cols, mn, rmn, mu[i], tr, reverse);
          }
        }
        if (frozen) {
          A.addmm_(zt, W);
          O.addmm_(rzt, W);
        }
      }
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t g = r0 + i;
        const float ls = std::log(s[i]), rls = std::log(rs[i]);
        const float L = m[i] + ls, RL = rm[i] + rls;
        o_lse[g] = L;
        o_rlse[g] = RL;
        // KL(a‖b) = Σ a(z_a − z_b)/Σ a − lse_a + lse_b, the lse difference formed from the maxima first.
        o_kl[g] = !reverse ? cross[i] / rs[i] - (rm[i] - m[i]) - (rls - ls)
                           : cross[i] / s[i] - (m[i] - rm[i]) - (ls - rls);
        if (has_lab) {
          o_logp[g] = zl[i] - L;
          o_rlogp[g] = rzl[i] - RL;
        }
        if (frozen) {  // forward: dkl = A/s − O/rs; reverse: dkl = O/s; ea = A/s
          float *a = A.data_ptr<float>() + i * D, *o = O.data_ptr<float>() + i * D;
          const float inv = 1.f / s[i], rinv = 1.f / rs[i];
          for (int64_t d = 0; d < D; ++d) o[d] = reverse ? o[d] * inv : a[d] * inv - o[d] * rinv;
          if (has_lab)
            for (int64_t d = 0; d < D; ++d) a[d] *= inv;
        }
      }
    }
  });
  g_last_scratch = cnt.bytes.load();
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

std::vector<Tensor> kl_forward_frozen(const Tensor& hidden, const Tensor& weight, const OptTensor& bias,
                                      const Tensor& ref_hidden, const Tensor& ref_weight, const OptTensor& ref_bias,
                                      const OptTensor& labels, double temperature, double softcap,
                                      double ref_softcap, bool reverse) {
  return kl_forward_impl(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, temperature, softcap,
                         ref_softcap, reverse, true);
}

std::vector<Tensor> kl_backward(const Tensor& hidden, const Tensor& weight, const OptTensor& bias,
                                const Tensor& ref_hidden, const Tensor& ref_weight, const OptTensor& ref_bias,
                                const OptTensor& labels, const Tensor& lse, const Tensor& ref_lse,
                                const Tensor& kl, const OptTensor& grad_kl, const OptTensor& grad_logp,
                                double temperature, double softcap, double ref_softcap, bool reverse,
                                bool need_h, bool need_w, bool need_b) {
  check_inputs(hidden, weight, bias, "kl_backward");
  check_inputs(ref_hidden, ref_weight, ref_bias, "kl_backward (reference)", true);
  const int64_t N = hidden.size(0), D = hidden.size(1), V = weight.size(0), Dr = ref_hidden.size(1);
  TORCH_CHECK(ref_hidden.size(0) == N && ref_weight.size(0) == V, "kl_backward: shapes of the reference");
  const bool has_lab = labels.has_value() && labels->defined();
  if (has_lab)
    TORCH_CHECK(labels->scalar_type() == at::kLong && labels->is_contiguous() && labels->numel() == N,
                "kl_backward: labels must be contiguous int64 [N]");
  check_f32_vec(lse, N, "lse");
  check_f32_vec(ref_lse, N, "ref_lse");
  check_f32_vec(kl, N, "kl");
  check_f32_vec(grad_kl, N, "grad_kl");
  check_f32_vec(grad_logp, N, "grad_logp");
  const Transform tr = make_transform(temperature, softcap), rtr = make_transform(temperature, ref_softcap);
  const auto f32 = hidden.options().dtype(at::kFloat);
  const Tiling tl = tiling(N, V);
  const int64_t R = tl.rows, C = tl.chunk, T = tl.threads;
  const int64_t* lab = has_lab ? labels->data_ptr<int64_t>() : nullptr;
  const float *p_lse = lse.data_ptr<float>(), *p_rlse = ref_lse.data_ptr<float>(), *p_kl = kl.data_ptr<float>();
  const float* g_kl = ptr_or_null(grad_kl);
  const float* g_logp = has_lab ? ptr_or_null(grad_logp) : nullptr;  // without labels logp is not an output
  Counter cnt;
  HeadGrads grads(T, need_h, need_w, need_b, hidden, weight, bias);
  std::vector<Tensor> ztiles(T), rztiles(T), hbufs(T), rhbufs(T), rbbufs(T);
  Tensor wbuf, rwbuf, bbuf;

  for (int64_t c0 = 0; c0 < V; c0 += C) {
    const int64_t cols = std::min(C, V - c0);
    const Tensor W = f32_rows(weight, c0, cols, wbuf, C * D, cnt);
    const Tensor RW = f32_rows(ref_weight, c0, cols, rwbuf, C * Dr, cnt);
    const float* bp = f32_vec(bias, c0, cols, bbuf, C, cnt);
    // The reference bias is transformed into rz in place (per thread), so it is read through a copy too.
    grads.start();
    at::parallel_for(0, tl.blocks, 1, [&](int64_t b0, int64_t b1) {
      const int tid = at::get_thread_num();
      if (!ztiles[tid].defined()) {
        ztiles[tid] = cnt.alloc(R * C, f32);
        rztiles[tid] = cnt.alloc(R * C, f32);
      }
      const float* rbp = f32_vec(ref_bias, c0, cols, rbbufs[tid], C, cnt);
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t r0 = blk * R, rows = std::min(R, N - r0);
        Tensor H = f32_rows(hidden, r0, rows, hbufs[tid], R * D, cnt);
        Tensor RH = f32_rows(ref_hidden, r0, rows, rhbufs[tid], R * Dr, cnt);
        Tensor zt = ztiles[tid].narrow(0, 0, rows * cols).view({rows, cols});
        Tensor rzt = rztiles[tid].narrow(0, 0, rows * cols).view({rows, cols});
        at::mm_out(zt, H, W.t());
        at::mm_out(rzt, RH, RW.t());
        float *zp = zt.data_ptr<float>(), *rzp = rzt.data_ptr<float>();
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t g = r0 + i;
          float *x = zp + i * cols, *rz = rzp + i * cols;
          transform_row(rz, rbp, cols, rtr);
          const int64_t l = has_lab ? lab[g] - c0 : -1;
          const bool inside = g_logp != nullptr && l >= 0 && l < cols;
          const float raw_l = inside ? x[l] + (bp ? bp[l] : 0.f) : 0.f;
          const float gl = g_logp ? g_logp[g] : 0.f;
          kl_grad_row(x, bp, rz, cols, tr, p_lse[g], p_rlse[g], p_kl[g], g_kl ? g_kl[g] : 0.f, gl, reverse);
          if (inside) x[l] += gl * dzdx_at(raw_l, tr);
        }
        grads.add(tid, zt, H, W, r0, C, cnt);
      }
    });
    grads.finish(c0, cols, D);
  }
  g_last_scratch = cnt.bytes.load();
  return {grads.dH, grads.dW, grads.db};
}

}  // namespace fastpref_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace fastpref_cpu;
  m.doc() = "fastpref native CPU kernels (vocabulary-chunked GEMM + fused per-row epilogue)";
  m.def("stats_forward", &stats_forward);
  m.def("stats_forward_frozen", &stats_forward_frozen);
  m.def("stats_backward", &stats_backward);
  m.def("kl_forward", &kl_forward);
  m.def("kl_forward_frozen", &kl_forward_frozen,
        "kl_forward plus dkl = ∂KL/∂h and (with labels) ea = E_p[s·W], float32 [N, D], for a frozen policy head");
  m.def("kl_backward", &kl_backward);
  m.def("set_tiling", [](int64_t rows, int64_t chunk) {
    TORCH_CHECK(rows >= 1 && chunk >= 1, "set_tiling: sizes must be >= 1");
    g_rows = rows;
    g_chunk = chunk;
  });
  m.def("get_tiling", []() { return std::make_pair(g_rows, g_chunk); });
  m.def("tiling", [](int64_t N, int64_t V) {
    Tiling t = tiling(N, V);
    return std::make_tuple(t.rows, t.chunk, t.threads);
  }, "(rows per block, vocabulary chunk, threads) used for a problem of N rows and V entries");
  m.def("scratch_bound_bytes", [](int64_t N, int64_t D, int64_t D_ref, int64_t V) {
    Tiling t = tiling(N, V);
    return 4 * scratch_bound_elems(t.threads, t.rows, t.chunk, D, D_ref);
  }, "documented bound on the scratch bytes of one call (excludes outputs, gradients and dH)");
  m.def("last_scratch_bytes", []() { return g_last_scratch.load(); });
  m.def("simd_path", []() { return std::string(simd_path()); },
        "the instruction-set level of the row loops picked at load time: 'x86-64-v3' or 'baseline'");
}
