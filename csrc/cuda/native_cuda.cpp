// fastpref._native_cuda: the binding of the CUDA backend. GEMMs go through ATen (cuBLAS) into float32
// tiles; the fused epilogues are the kernels of epilogue.cu, launched on the current stream.
//
// Same algorithm as the CPU module (csrc/cpu/native_cpu.cpp): the forward loops row blocks × vocabulary
// chunks and keeps per-row running state in float32 [N] arrays; the backward loops chunks × row blocks,
// recomputes each tile, turns it into dL/dx in place and runs dH_block += dx·W_chunk (float32 [N, D]) and
// dW_chunk += dxᵀ·H_block (float32 [C, D] accumulator, written to dW once per chunk).
//
// Scratch (float32 elements), R rows × C vocabulary entries per tile (R = C = 4096 by default):
//     2·R·C + R·(D + D_ref) + C·(2·D + D_ref) + 2·C  (+ 9·N per-row state)
// — logits tiles (two for token_kl), float32 copies of non-float32 hidden blocks / weight chunks / bias
// chunks, the dW/db chunk accumulators. Half inputs are upcast per block, so GEMMs run in float32 (no
// tensor cores; the Triton backend is the fast GPU path, this one the portable reference-speed path).
#include <torch/extension.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

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

static const int64_t* lab_ptr(const OptTensor& labels, int64_t N) {
  if (!has(labels)) return nullptr;
  TORCH_CHECK(labels->scalar_type() == at::kLong && labels->is_contiguous() && labels->numel() == N,
              "labels must be contiguous int64 [N]");
  return labels->data_ptr<int64_t>();
}

static Tensor tile_view(Tensor& buf, int64_t rows, int64_t cols) {
  return buf.narrow(0, 0, rows * cols).view({rows, cols});
}

// ---- token_stats --------------------------------------------------------------------------------
std::vector<Tensor> stats_forward(const Tensor& hidden, const Tensor& weight, const OptTensor& bias,
                                  const Tensor& labels, double temperature, double softcap, bool want_ent,
                                  bool want_p2) {
  check_head(hidden, weight, bias, "stats_forward");
  c10::cuda::CUDAGuard guard(hidden.device());
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
  Tensor tilebuf = at::empty({R * C}, f32), hbuf, wbuf, bbuf;
  for (int64_t r0 = 0; r0 < N; r0 += R) {
    const int64_t rows = std::min(R, N - r0);
    Tensor H = f32_rows(hidden, r0, rows, hbuf, R * D);
    for (int64_t c0 = 0; c0 < V; c0 += C) {
      const int64_t cols = std::min(C, V - c0);
      Tensor W = f32_rows(weight, c0, cols, wbuf, C * D);
      const float* bp = f32_vec(bias, c0, cols, bbuf, C);
      Tensor tile = tile_view(tilebuf, rows, cols);
      at::mm_out(tile, H, W.t());
      stats_fwd_tile(tile.data_ptr<float>(), rows, cols, bp, tr, lab + r0, c0, ptr(m) + r0, ptr(s) + r0,
                     want_ent ? ptr(t) + r0 : nullptr, want_p2 ? ptr(s2) + r0 : nullptr, ptr(zl) + r0, stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  stats_finish(N, ptr(m), ptr(s), ptr(t), ptr(s2), ptr(zl), ptr(logp), ptr(lse), ptr(ent), ptr(p2), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {logp, lse, ent, p2};
}

struct ChunkGrads {
  bool need_w, need_b;
  Tensor dW, db, dwc, dbc;
  ChunkGrads(bool nw, bool nb, const Tensor& weight, const OptTensor& bias, int64_t C)
      : need_w(nw), need_b(nb && has(bias)) {
    const auto f32 = weight.options().dtype(at::kFloat);
    if (need_w) {
      dW = at::empty_like(weight);
      dwc = at::empty({C * weight.size(1)}, f32);
    }
    if (need_b) {
      db = at::empty_like(*bias);
      dbc = at::empty({C}, f32);
    }
  }
  void add(const Tensor& dx, const Tensor& H, bool first) {
    const int64_t cols = dx.size(1), D = H.size(1);
    if (need_w) {
      Tensor p = dwc.narrow(0, 0, cols * D).view({cols, D});
      if (first) at::mm_out(p, dx.t(), H); else p.addmm_(dx.t(), H);
    }
    if (need_b) {
      Tensor p = dbc.narrow(0, 0, cols);
      if (first) at::sum_out(p, dx, {0}); else p.add_(dx.sum(0));
    }
  }
  void finish(int64_t c0, int64_t cols, int64_t D) {
    if (need_w) dW.narrow(0, c0, cols).copy_(dwc.narrow(0, 0, cols * D).view({cols, D}));
    if (need_b) db.narrow(0, c0, cols).copy_(dbc.narrow(0, 0, cols));
  }
};

std::vector<Tensor> stats_backward(const Tensor& hidden, const Tensor& weight, const OptTensor& bias,
                                   const Tensor& labels, const Tensor& lse, const OptTensor& entropy,
                                   const OptTensor& grad_logp, const OptTensor& grad_lse,
                                   const OptTensor& grad_entropy, double temperature, double softcap, bool need_h,
                                   bool need_w, bool need_b) {
  check_head(hidden, weight, bias, "stats_backward");
  c10::cuda::CUDAGuard guard(hidden.device());
  auto stream = at::cuda::getCurrentCUDAStream().stream();
  const int64_t N = hidden.size(0), D = hidden.size(1), V = weight.size(0);
  const int64_t R = std::min(N, g_rows), C = std::min(V, g_chunk);
  const Transform tr = make_transform(temperature, softcap);
  const auto f32 = hidden.options().dtype(at::kFloat);
  const int64_t* lab = lab_ptr(labels, N);
  const bool ge = has(grad_entropy);
  TORCH_CHECK(!ge || has(entropy), "stats_backward: grad_entropy needs entropy");
  Tensor dH = need_h ? at::zeros({N, D}, f32) : Tensor();
  ChunkGrads grads(need_w, need_b, weight, bias, C);
  Tensor tilebuf = at::empty({R * C}, f32), hbuf, wbuf, bbuf;
  for (int64_t c0 = 0; c0 < V; c0 += C) {
    const int64_t cols = std::min(C, V - c0);
    Tensor W = f32_rows(weight, c0, cols, wbuf, C * D);
    const float* bp = f32_vec(bias, c0, cols, bbuf, C);
    for (int64_t r0 = 0; r0 < N; r0 += R) {
      const int64_t rows = std::min(R, N - r0);
      Tensor H = f32_rows(hidden, r0, rows, hbuf, R * D);
      Tensor tile = tile_view(tilebuf, rows, cols);
      at::mm_out(tile, H, W.t());
      const float* gl = ptr(grad_logp);
      const float* gs = ptr(grad_lse);
      const float* gen = ptr(grad_entropy);
      const float* en = ptr(entropy);
      stats_bwd_tile(tile.data_ptr<float>(), rows, cols, bp, tr, gl ? lab + r0 : nullptr, c0,
                     lse.data_ptr<float>() + r0, ge ? en + r0 : nullptr, gl ? gl + r0 : nullptr,
                     gs ? gs + r0 : nullptr, ge ? gen + r0 : nullptr, stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (need_h) dH.narrow(0, r0, rows).addmm_(tile, W);
      grads.add(tile, H, r0 == 0);
    }
    grads.finish(c0, cols, D);
  }
  return {dH, grads.dW, grads.db};
}

// ---- token_kl -----------------------------------------------------------------------------------
std::vector<Tensor> kl_forward(const Tensor& hidden, const Tensor& weight, const OptTensor& bias,
                               const Tensor& ref_hidden, const Tensor& ref_weight, const OptTensor& ref_bias,
                               const OptTensor& labels, double temperature, double softcap, double ref_softcap,
                               bool reverse) {
  check_head(hidden, weight, bias, "kl_forward");
  check_head(ref_hidden, ref_weight, ref_bias, "kl_forward (reference)");
  c10::cuda::CUDAGuard guard(hidden.device());
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
  Tensor zbuf = at::empty({R * C}, f32), rzbuf = at::empty({R * C}, f32);
  Tensor hbuf, rhbuf, wbuf, rwbuf, bbuf, rbbuf;
  for (int64_t r0 = 0; r0 < N; r0 += R) {
    const int64_t rows = std::min(R, N - r0);
    Tensor H = f32_rows(hidden, r0, rows, hbuf, R * D);
    Tensor RH = f32_rows(ref_hidden, r0, rows, rhbuf, R * Dr);
    for (int64_t c0 = 0; c0 < V; c0 += C) {
      const int64_t cols = std::min(C, V - c0);
      Tensor W = f32_rows(weight, c0, cols, wbuf, C * D);
      Tensor RW = f32_rows(ref_weight, c0, cols, rwbuf, C * Dr);
      const float* bp = f32_vec(bias, c0, cols, bbuf, C);
      const float* rbp = f32_vec(ref_bias, c0, cols, rbbuf, C);
      Tensor zt = tile_view(zbuf, rows, cols), rzt = tile_view(rzbuf, rows, cols);
      at::mm_out(zt, H, W.t());
      at::mm_out(rzt, RH, RW.t());
      kl_fwd_tile(zt.data_ptr<float>(), rzt.data_ptr<float>(), rows, cols, bp, rbp, tr, rtr, lab ? lab + r0 : nullptr,
                  c0, reverse ? 1 : 0, ptr(m) + r0, s + r0, ptr(rm) + r0, rs + r0, cross + r0, zl + r0, rzl + r0,
                  stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  kl_finish(N, reverse ? 1 : 0, ptr(m), s, ptr(rm), rs, cross, zl, rzl, ptr(kl), ptr(lse), ptr(rlse), ptr(logp),
            ptr(rlogp), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {kl, lse, rlse, logp, rlogp};
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
  auto stream = at::cuda::getCurrentCUDAStream().stream();
  const int64_t N = hidden.size(0), D = hidden.size(1), V = weight.size(0), Dr = ref_hidden.size(1);
  const int64_t R = std::min(N, g_rows), C = std::min(V, g_chunk);
  const Transform tr = make_transform(temperature, softcap), rtr = make_transform(temperature, ref_softcap);
  const auto f32 = hidden.options().dtype(at::kFloat);
  const int64_t* lab = lab_ptr(labels, N);
  const float* gl = lab ? ptr(grad_logp) : nullptr;
  const float* gk = ptr(grad_kl);
  Tensor dH = need_h ? at::zeros({N, D}, f32) : Tensor();
  ChunkGrads grads(need_w, need_b, weight, bias, C);
  Tensor zbuf = at::empty({R * C}, f32), rzbuf = at::empty({R * C}, f32);
  Tensor hbuf, rhbuf, wbuf, rwbuf, bbuf, rbbuf;
  for (int64_t c0 = 0; c0 < V; c0 += C) {
    const int64_t cols = std::min(C, V - c0);
    Tensor W = f32_rows(weight, c0, cols, wbuf, C * D);
    Tensor RW = f32_rows(ref_weight, c0, cols, rwbuf, C * Dr);
    const float* bp = f32_vec(bias, c0, cols, bbuf, C);
    const float* rbp = f32_vec(ref_bias, c0, cols, rbbuf, C);
    for (int64_t r0 = 0; r0 < N; r0 += R) {
      const int64_t rows = std::min(R, N - r0);
      Tensor H = f32_rows(hidden, r0, rows, hbuf, R * D);
      Tensor RH = f32_rows(ref_hidden, r0, rows, rhbuf, R * Dr);
      Tensor zt = tile_view(zbuf, rows, cols), rzt = tile_view(rzbuf, rows, cols);
      at::mm_out(zt, H, W.t());
      at::mm_out(rzt, RH, RW.t());
      kl_bwd_tile(zt.data_ptr<float>(), rzt.data_ptr<float>(), rows, cols, bp, rbp, tr, rtr,
                  gl ? lab + r0 : nullptr, c0, reverse ? 1 : 0, lse.data_ptr<float>() + r0,
                  ref_lse.data_ptr<float>() + r0, kl.data_ptr<float>() + r0, gk ? gk + r0 : nullptr,
                  gl ? gl + r0 : nullptr, stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (need_h) dH.narrow(0, r0, rows).addmm_(zt, W);
      grads.add(zt, H, r0 == 0);
    }
    grads.finish(c0, cols, D);
  }
  return {dH, grads.dW, grads.db};
}

}  // namespace fastpref_cuda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace fastpref_cuda;
  m.doc() = "fastpref native CUDA kernels (cuBLAS GEMM through ATen + fused epilogue kernels)";
  m.def("stats_forward", &stats_forward);
  m.def("stats_backward", &stats_backward);
  m.def("kl_forward", &kl_forward);
  m.def("kl_backward", &kl_backward);
  m.def("set_tiling", [](int64_t rows, int64_t chunk) {
    TORCH_CHECK(rows >= 1 && chunk >= 1, "set_tiling: sizes must be >= 1");
    g_rows = rows;
    g_chunk = chunk;
  });
  m.def("get_tiling", []() { return std::make_pair(g_rows, g_chunk); });
}
