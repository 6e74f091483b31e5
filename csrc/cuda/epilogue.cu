// Fused epilogue kernels (see epilogue.h). No torch headers: `nvcc -Xptxas -v -c` reports registers and
// spills for every kernel in seconds (csrc/check_cuda_compile.py).
//
// Row kernels (forward): one block of ROW_THREADS threads per tile row; pass 1 transforms the row in place
// and reduces its max, pass 2 reduces the exp sums, thread 0 folds them into the running state. Their
// FROZEN instances (frozen heads) also overwrite the tile(s) with the weights of the expectation GEMMs in
// pass 2 (the label logit is picked up in pass 1 for that reason) and write each row's rescale
// coefficients; reverse token_kl adds a pass 3 that centres its weights on the new running mean μ.
// Element kernels (backward): a 2-D grid (vocabulary × rows), each thread turns one logit into dL/dx.
// rows_update: a grid-stride loop over a [rows, D] accumulator pair (the frozen heads' per-row rescale).
#include <algorithm>
#include <cmath>

#include "epilogue.h"

namespace fastpref_cuda {
namespace {

constexpr int ROW_THREADS = 256;
constexpr int ELEM_THREADS = 256;

__device__ __forceinline__ float transform(float x, const Transform& tr) {
  return tr.softcap ? tanhf(x * tr.inv_cap) * tr.cap_t : x * tr.inv_t;
}

__device__ __forceinline__ float dzdx(float x, const Transform& tr) {
  if (!tr.softcap) return tr.inv_t;
  float c = tanhf(x * tr.inv_cap);
  return (1.0f - c * c) * tr.inv_t;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide reduction of up to 3 values (sum or max); every thread gets the results.
template <int K, bool MAX>
__device__ __forceinline__ void block_reduce(float (&v)[K]) {
  __shared__ float buf[K][ROW_THREADS / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    v[k] = MAX ? warp_max(v[k]) : warp_sum(v[k]);
    if (lane == 0) buf[k][warp] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    float x = lane < ROW_THREADS / 32 ? buf[k][lane] : (MAX ? -INFINITY : 0.0f);
    v[k] = MAX ? warp_max(x) : warp_sum(x);
  }
  __syncthreads();  // buf is reused by the next call
}

// e·x, or 0 where e = 0: a banned token (bias −inf) has e = 0 and x = ±inf or NaN, and 0·(±inf) is NaN.
__device__ __forceinline__ float weighted(float e, float x) { return e > 0.0f ? e * x : 0.0f; }

// The max to subtract: 0 while every logit so far is −inf (banned tokens), where exp(−inf − (−inf)) is NaN.
__device__ __forceinline__ float exp_base(float m) { return m == -INFINITY ? 0.0f : m; }

// Rescale factor of the old running sums when the max moves from mo to mn (mo = −inf: nothing yet).
__device__ __forceinline__ float rescale(float mo, float mn, float* shift) {
  *shift = isinf(mo) ? 0.0f : mo - mn;
  return expf(*shift);
}

// dz/dx from the transformed logit z: 1/T, or (1 − c²)/T with c = tanh(x/cap) = z/(cap/T). A division, not a
// product with the reciprocal, so that a saturated logit z = ±cap/T (a −inf bias under a softcap) gives
// c = ±1 and slope 0 exactly.
__device__ __forceinline__ float slope_of_z(float z, const Transform& tr) {
  if (!tr.softcap) return tr.inv_t;
  const float c = z / tr.cap_t;
  return (1.0f - c * c) * tr.inv_t;
}

// FROZEN: also the weights tiles and rescale coefficients of the frozen-head accumulators (epilogue.h).
template <bool FROZEN>
__global__ void __launch_bounds__(ROW_THREADS)
stats_fwd_kernel(float* __restrict__ tile, int cols, const float* __restrict__ bias, Transform tr,
                 const int64_t* __restrict__ labels, int64_t c0, float* m, float* s, float* t, float* s2,
                 float* zl, float* __restrict__ tw, RowCoefs coef) {
  const int row = blockIdx.x;
  float* z = tile + static_cast<int64_t>(row) * cols;
  const int64_t label = labels ? labels[row] - c0 : -1;  // inside this tile when 0 <= label < cols
  float mx[1] = {-INFINITY};
  for (int j = threadIdx.x; j < cols; j += ROW_THREADS) {
    float v = transform(z[j] + (bias ? bias[j] : 0.0f), tr);
    z[j] = v;
    mx[0] = fmaxf(mx[0], v);
    if (j == label) zl[row] += v;  // the one thread holding the label's logit (pass 2 may overwrite it)
  }
  block_reduce<1, true>(mx);
  const float mo = m[row], mn = fmaxf(mo, mx[0]), base = exp_base(mn);
  float acc[3] = {0.0f, 0.0f, 0.0f};  // Σe, Σe·d, Σe²
  for (int j = threadIdx.x; j < cols; j += ROW_THREADS) {
    float d = z[j] - base, e = expf(d);
    acc[0] += e;
    acc[1] += weighted(e, d);
    acc[2] += e * e;
    if (FROZEN) {
      const float w = e * slope_of_z(z[j], tr);  // ≥ 0; 0 at −inf logits
      if (tw) tw[static_cast<int64_t>(row) * cols + j] = weighted(w, d);
      z[j] = w;
    }
  }
  block_reduce<3, false>(acc);
  if (threadIdx.x == 0) {
    float shift, sc = rescale(mo, mn, &shift);
    if (t) t[row] = (t[row] + shift * s[row]) * sc + acc[1];
    if (s2) s2[row] = s2[row] * sc * sc + acc[2];
    s[row] = s[row] * sc + acc[0];
    m[row] = mn;
    if (FROZEN) {
      coef.sa[row] = sc;
      coef.st[row] = sc;
      coef.ta[row] = shift * sc;  // T ← (T + shift·A)·sc
    }
  }
}

__global__ void stats_finish_kernel(int rows, const float* m, const float* s, const float* t, const float* s2,
                                    const float* zl, float* logp, float* lse, float* ent, float* p2) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= rows) return;
  const float ls = logf(s[i]), L = m[i] + ls;
  lse[i] = L;
  logp[i] = zl[i] - L;
  if (ent) ent[i] = ls - t[i] / s[i];
  if (p2) p2[i] = logf(s2[i]) - 2.0f * ls;
}

__global__ void __launch_bounds__(ELEM_THREADS)
stats_bwd_kernel(float* __restrict__ tile, int cols, const float* __restrict__ bias, Transform tr,
                 const int64_t* __restrict__ labels, int64_t c0, const float* __restrict__ lse,
                 const float* __restrict__ ent, const float* __restrict__ g_logp,
                 const float* __restrict__ g_lse, const float* __restrict__ g_ent) {
  const int row = blockIdx.y;
  const int j = blockIdx.x * ELEM_THREADS + threadIdx.x;
  if (j >= cols) return;
  float* p_x = tile + static_cast<int64_t>(row) * cols + j;
  const float x = *p_x + (bias ? bias[j] : 0.0f);
  const float gl = g_logp ? g_logp[row] : 0.0f;
  const float coef = (g_lse ? g_lse[row] : 0.0f) - gl;
  const float lp = transform(x, tr) - lse[row], p = expf(lp);
  float dz = p * coef;
  if (g_ent) dz -= g_ent[row] * weighted(p, lp + ent[row]);
  if (labels && labels[row] - c0 == j) dz += gl;
  *p_x = dz * dzdx(x, tr);
}

template <bool FROZEN>
__global__ void __launch_bounds__(ROW_THREADS)
kl_fwd_kernel(float* __restrict__ zt, float* __restrict__ rzt, int cols, const float* __restrict__ bias,
              const float* __restrict__ ref_bias, Transform tr, Transform rtr, const int64_t* __restrict__ labels,
              int64_t c0, int reverse, float* m, float* s, float* rm, float* rs, float* cross, float* zl,
              float* rzl, RowCoefs coef) {
  const int row = blockIdx.x;
  float* z = zt + static_cast<int64_t>(row) * cols;
  float* rz = rzt + static_cast<int64_t>(row) * cols;
  const int64_t label = labels ? labels[row] - c0 : -1;  // inside this tile when 0 <= label < cols
  float mx[2] = {-INFINITY, -INFINITY};
  for (int j = threadIdx.x; j < cols; j += ROW_THREADS) {
    float a = transform(z[j] + (bias ? bias[j] : 0.0f), tr);
    float b = transform(rz[j] + (ref_bias ? ref_bias[j] : 0.0f), rtr);
    z[j] = a;
    rz[j] = b;
    mx[0] = fmaxf(mx[0], a);
    mx[1] = fmaxf(mx[1], b);
    if (j == label) {  // the one thread holding the label's logits (pass 2 may overwrite them)
      zl[row] += a;
      rzl[row] += b;
    }
  }
  block_reduce<2, true>(mx);
  // The old state, read by every thread before the reduction below (thread 0 writes the new state after it).
  const float mo = m[row], mn = fmaxf(mo, mx[0]), rmo = rm[row], rmn = fmaxf(rmo, mx[1]);
  const float so = s[row], rso = rs[row], co = cross[row];
  float acc[3] = {0.0f, 0.0f, 0.0f};  // Σe_pol, Σe_ref, cross
  for (int j = threadIdx.x; j < cols; j += ROW_THREADS) {
    float a = z[j], b = rz[j];
    float e = expf(a - exp_base(mn)), re = expf(b - exp_base(rmn));
    acc[0] += e;
    acc[1] += re;
    acc[2] += reverse ? weighted(e, a - b) : weighted(re, b - a);
    if (FROZEN) {
      const float sl = slope_of_z(a, tr);
      z[j] = e * sl;                      // ≥ 0; 0 at −inf policy logits
      rz[j] = reverse ? a - b : re * sl;  // reverse: d; both finished in pass 3
    }
  }
  block_reduce<3, false>(acc);
  float shift, sc = rescale(mo, mn, &shift), rshift, rsc = rescale(rmo, rmn, &rshift);
  const float sn = so * sc + acc[0], rsn = rso * rsc + acc[1], cn = co * (reverse ? sc : rsc) + acc[2];
  float ca = 0.0f, ct = 0.0f, cta = 0.0f;  // frozen: the coefficients sa, st, ta of this row (epilogue.h)
  if (FROZEN && reverse) {
    // B = Σ e^{z−m}·(d − μ)·s·W centred on μ = cross/s (0 while s = 0: no mass yet, and A = 0).
    const float mu = sn > 0.0f ? cn / sn : 0.0f;
    for (int j = threadIdx.x; j < cols; j += ROW_THREADS) {
      const float w = z[j];
      rz[j] = w != 0.0f ? w * (rz[j] - mu) : 0.0f;  // 0 where e·s = 0 (d may be NaN there)
    }
    ca = ct = sc;
    cta = ((so > 0.0f ? co / so : 0.0f) - mu) * sc;  // B ← (B + (μ_old − μ)·A)·sc
  } else if (FROZEN) {
    // Normalised by the running sums: P = Σ (e^{z−m}/s)·s·W and D = Σ (e^{z−m}/s − e^{rz−rm}/rs)·s·W, the
    // difference formed per entry before any rounding (p ≈ q must not cancel after it); P is EA itself, not
    // E_q[s·W] + D (whose rounded terms at tokens the reference favours would not cancel).
    const float inv = sn > 0.0f ? 1.0f / sn : 0.0f, rinv = rsn > 0.0f ? 1.0f / rsn : 0.0f;
    for (int j = threadIdx.x; j < cols; j += ROW_THREADS) {
      const float wp = z[j] * inv;
      z[j] = wp - rz[j] * rinv;
      rz[j] = wp;
    }
    ca = sc * so * inv;     // α: P's old terms e^{z−m_old}/s_old → e^{z−m}/s
    ct = rsc * rso * rinv;  // β: the old q terms likewise; D ← β·D + (α − β)·P
    cta = ca - ct;
  }
  if (threadIdx.x == 0) {
    cross[row] = cn;
    s[row] = sn;
    rs[row] = rsn;
    m[row] = mn;
    rm[row] = rmn;
    if (FROZEN) {
      coef.sa[row] = ca;
      coef.st[row] = ct;
      coef.ta[row] = cta;
    }
  }
}

__global__ void kl_finish_kernel(int rows, int reverse, const float* m, const float* s, const float* rm,
                                 const float* rs, const float* cross, const float* zl, const float* rzl,
                                 float* kl, float* lse, float* ref_lse, float* logp, float* ref_logp) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= rows) return;
  const float ls = logf(s[i]), rls = logf(rs[i]);
  const float L = m[i] + ls, RL = rm[i] + rls;
  lse[i] = L;
  ref_lse[i] = RL;
  kl[i] = reverse ? cross[i] / s[i] - (m[i] - rm[i]) - (ls - rls) : cross[i] / rs[i] - (rm[i] - m[i]) - (rls - ls);
  if (logp) {
    logp[i] = zl[i] - L;
    ref_logp[i] = rzl[i] - RL;
  }
}

__global__ void __launch_bounds__(ELEM_THREADS)
kl_bwd_kernel(float* __restrict__ zt, const float* __restrict__ rzt, int cols, const float* __restrict__ bias,
              const float* __restrict__ ref_bias, Transform tr, Transform rtr, const int64_t* __restrict__ labels,
              int64_t c0, int reverse, const float* __restrict__ lse, const float* __restrict__ ref_lse,
              const float* __restrict__ kl, const float* __restrict__ g_kl, const float* __restrict__ g_logp) {
  const int row = blockIdx.y;
  const int j = blockIdx.x * ELEM_THREADS + threadIdx.x;
  if (j >= cols) return;
  const int64_t k = static_cast<int64_t>(row) * cols + j;
  const float x = zt[k] + (bias ? bias[j] : 0.0f);
  const float lq = transform(rzt[k] + (ref_bias ? ref_bias[j] : 0.0f), rtr) - ref_lse[row];
  const float lp = transform(x, tr) - lse[row], p = expf(lp);
  const float gk = g_kl ? g_kl[row] : 0.0f, gl = g_logp ? g_logp[row] : 0.0f;
  float dz = reverse ? gk * weighted(p, lp - lq - kl[row]) : gk * (p - expf(lq));
  dz -= gl * p;
  if (labels && labels[row] - c0 == j) dz += gl;
  zt[k] = dz * dzdx(x, tr);
}

__global__ void __launch_bounds__(ELEM_THREADS)
rows_update_kernel(float* __restrict__ a, float* __restrict__ t, const float* __restrict__ pa,
                   const float* __restrict__ pt, const float* __restrict__ sa, const float* __restrict__ st,
                   const float* __restrict__ ta, int64_t n, int64_t D) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * ELEM_THREADS;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * ELEM_THREADS + threadIdx.x; k < n; k += stride) {
    const int64_t row = k / D;
    const float av = a[k];
    if (t) t[k] = st[row] * t[k] + (ta ? ta[row] * av : 0.0f) + (pt ? pt[k] : 0.0f);
    a[k] = sa[row] * av + (pa ? pa[k] : 0.0f);
  }
}

inline unsigned blocks_for(int64_t n, int threads) { return static_cast<unsigned>((n + threads - 1) / threads); }

}  // namespace

cudaError_t kernel_image_status() {
  cudaFuncAttributes attr;
  const cudaError_t err = cudaFuncGetAttributes(&attr, stats_fwd_kernel<false>);
  if (err != cudaSuccess) cudaGetLastError();
  return err;
}

void stats_fwd_tile(float* tile, int64_t rows, int64_t cols, const float* bias, Transform tr,
                    const int64_t* labels, int64_t c0, float* m, float* s, float* t, float* s2, float* zl,
                    float* tw, RowCoefs coef, cudaStream_t stream) {
  if (rows == 0) return;
  const auto kernel = coef.sa ? stats_fwd_kernel<true> : stats_fwd_kernel<false>;
  kernel<<<static_cast<unsigned>(rows), ROW_THREADS, 0, stream>>>(tile, static_cast<int>(cols), bias, tr, labels, c0,
                                                                  m, s, t, s2, zl, tw, coef);
}

void stats_finish(int64_t rows, const float* m, const float* s, const float* t, const float* s2, const float* zl,
                  float* logp, float* lse, float* ent, float* p2, cudaStream_t stream) {
  if (rows == 0) return;
  stats_finish_kernel<<<blocks_for(rows, 256), 256, 0, stream>>>(static_cast<int>(rows), m, s, t, s2, zl, logp,
                                                                  lse, ent, p2);
}

void stats_bwd_tile(float* tile, int64_t rows, int64_t cols, const float* bias, Transform tr,
                    const int64_t* labels, int64_t c0, const float* lse, const float* ent, const float* g_logp,
                    const float* g_lse, const float* g_ent, cudaStream_t stream) {
  if (rows == 0) return;
  dim3 grid(blocks_for(cols, ELEM_THREADS), static_cast<unsigned>(rows));
  stats_bwd_kernel<<<grid, ELEM_THREADS, 0, stream>>>(tile, static_cast<int>(cols), bias, tr, labels, c0, lse, ent,
                                                      g_logp, g_lse, g_ent);
}

void kl_fwd_tile(float* z, float* rz, int64_t rows, int64_t cols, const float* bias, const float* ref_bias,
                 Transform tr, Transform rtr, const int64_t* labels, int64_t c0, int reverse, float* m, float* s,
                 float* rm, float* rs, float* cross, float* zl, float* rzl, RowCoefs coef, cudaStream_t stream) {
  if (rows == 0) return;
  const auto kernel = coef.sa ? kl_fwd_kernel<true> : kl_fwd_kernel<false>;
  kernel<<<static_cast<unsigned>(rows), ROW_THREADS, 0, stream>>>(z, rz, static_cast<int>(cols), bias, ref_bias, tr,
                                                                  rtr, labels, c0, reverse, m, s, rm, rs, cross, zl,
                                                                  rzl, coef);
}

void kl_finish(int64_t rows, int reverse, const float* m, const float* s, const float* rm, const float* rs,
               const float* cross, const float* zl, const float* rzl, float* kl, float* lse, float* ref_lse,
               float* logp, float* ref_logp, cudaStream_t stream) {
  if (rows == 0) return;
  kl_finish_kernel<<<blocks_for(rows, 256), 256, 0, stream>>>(static_cast<int>(rows), reverse, m, s, rm, rs, cross,
                                                               zl, rzl, kl, lse, ref_lse, logp, ref_logp);
}

void kl_bwd_tile(float* z, const float* rz, int64_t rows, int64_t cols, const float* bias, const float* ref_bias,
                 Transform tr, Transform rtr, const int64_t* labels, int64_t c0, int reverse, const float* lse,
                 const float* ref_lse, const float* kl, const float* g_kl, const float* g_logp,
                 cudaStream_t stream) {
  if (rows == 0) return;
  dim3 grid(blocks_for(cols, ELEM_THREADS), static_cast<unsigned>(rows));
  kl_bwd_kernel<<<grid, ELEM_THREADS, 0, stream>>>(z, rz, static_cast<int>(cols), bias, ref_bias, tr, rtr, labels,
                                                   c0, reverse, lse, ref_lse, kl, g_kl, g_logp);
}

void rows_update(float* a, float* t, const float* pa, const float* pt, const float* sa, const float* st,
                 const float* ta, int64_t rows, int64_t D, cudaStream_t stream) {
  const int64_t n = rows * D;
  if (n == 0) return;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((n + ELEM_THREADS - 1) / ELEM_THREADS, 1 << 20));
  rows_update_kernel<<<blocks, ELEM_THREADS, 0, stream>>>(a, t, pa, pt, sa, st, ta, n, D);
}

}  // namespace fastpref_cuda
