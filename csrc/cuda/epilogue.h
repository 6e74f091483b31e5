// Fused epilogue kernels of the CUDA backend: plain CUDA C++ (no torch headers), raw pointers and a stream.
//
// The binding (native_cuda.cpp) runs the GEMMs through ATen/cuBLAS into a float32 logits tile
// [rows, cols] (row-major, contiguous) and calls these launchers on the current stream. Per-row running
// state (m, s, t, s2, KL cross term, label logits) lives in float32 arrays of the block's rows.
// Pointers documented "or null" may be null; all others must be valid device pointers.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace fastpref_cuda {

// z = softcap ? cap·tanh(x/cap)/T : x/T, with x the GEMM output plus bias.
struct Transform {
  int softcap;    // 0 or 1
  float inv_cap;  // 1/cap
  float cap_t;    // cap/T
  float inv_t;    // 1/T
};

// Frozen heads (fastpref/_frozen.py): the forward kernels also write weights tiles for the expectation
// GEMMs P = weights·W_chunk ([rows, cols]·[cols, D]) and, per row, the coefficients with which rows_update
// folds the products into two float32 [rows, D] accumulators a and t: t ← st·t + ta·a + pt, a ← sa·a + pa.
// All null: a plain forward.
struct RowCoefs {
  float* sa;
  float* st;
  float* ta;
};

// token_stats forward: fold one tile into the running state; tile ← z (transformed logits).
// labels: the block's labels (or null); c0: the tile's first vocabulary index. t / s2: or null.
// Frozen (coef.sa not null): tile ← e^{z−m}·dz/dx instead, tw (entropy, or null) ← e^{z−m}·(z − m)·dz/dx
// (0 at −inf logits), with m the new running max; coef ← the rescale of A = Σ e^{z−m}·(dz/dx)·W and
// T = Σ e^{z−m}(z − m)·(dz/dx)·W as m moves: sa = st = e^{m_old − m}, ta = (m_old − m)·e^{m_old − m}.
void stats_fwd_tile(float* tile, int64_t rows, int64_t cols, const float* bias, Transform tr,
                    const int64_t* labels, int64_t c0, float* m, float* s, float* t, float* s2, float* zl,
                    float* tw, RowCoefs coef, cudaStream_t stream);
// logp = zl − lse, lse = m + log s, entropy = log s − t/s, log Σp² = log s2 − 2 log s (ent / p2: or null).
void stats_finish(int64_t rows, const float* m, const float* s, const float* t, const float* s2,
                  const float* zl, float* logp, float* lse, float* ent, float* p2, cudaStream_t stream);
// token_stats backward: tile (raw GEMM output) ← dL/dx. g_logp / g_lse / g_ent / ent: or null (zero).
void stats_bwd_tile(float* tile, int64_t rows, int64_t cols, const float* bias, Transform tr,
                    const int64_t* labels, int64_t c0, const float* lse, const float* ent, const float* g_logp,
                    const float* g_lse, const float* g_ent, cudaStream_t stream);

// token_kl forward: z / rz (raw GEMM outputs of policy / reference) ← transformed logits, state updated.
// reverse = 0: KL(ref‖θ), cross = Σ e^{rz−rm}(rz − z); reverse = 1: KL(θ‖ref), cross = Σ e^{z−m}(z − rz).
// Frozen policy head (coef.sa not null; s_v: the policy's dz/dx; m, s, rm, rs: the new running maxima and sums).
// forward: rz ← (e^{z−m}/s)·s, z ← (e^{z−m}/s − e^{rz−rm}/rs)·s; a = P = Σ (e^{z−m}/s)·s·W (= E_p[s·W] at the
// end) and t = D = Σ (e^{z−m}/s − e^{rz−rm}/rs)·s·W (= E_p[s·W] − E_q[s·W]), coef: sa = α, st = β,
// ta = α − β with α = e^{m_old−m}·s_old/s, β = e^{rm_old−rm}·rs_old/rs. reverse: z ← e^{z−m}·s, rz ←
// e^{z−m}·(d − μ)·s with d = z − rz and μ = cross/s the new running mean of d under p; a = A = Σ e^{z−m}·s·W,
// t = B = Σ e^{z−m}·(d − μ)·s·W (kept centred), coef: sa = st = e^{m_old−m}, ta = (μ_old − μ)·e^{m_old−m}.
void kl_fwd_tile(float* z, float* rz, int64_t rows, int64_t cols, const float* bias, const float* ref_bias,
                 Transform tr, Transform rtr, const int64_t* labels, int64_t c0, int reverse, float* m, float* s,
                 float* rm, float* rs, float* cross, float* zl, float* rzl, RowCoefs coef, cudaStream_t stream);
void kl_finish(int64_t rows, int reverse, const float* m, const float* s, const float* rm, const float* rs,
               const float* cross, const float* zl, const float* rzl, float* kl, float* lse, float* ref_lse,
               float* logp, float* ref_logp, cudaStream_t stream);
// token_kl backward: z (raw policy GEMM output) ← dL/dx; rz: raw reference GEMM output (unchanged).
void kl_bwd_tile(float* z, const float* rz, int64_t rows, int64_t cols, const float* bias, const float* ref_bias,
                 Transform tr, Transform rtr, const int64_t* labels, int64_t c0, int reverse, const float* lse,
                 const float* ref_lse, const float* kl, const float* g_kl, const float* g_logp,
                 cudaStream_t stream);

// Per-row linear update of float32 [rows, D] accumulators (row-major, contiguous), coefficients [rows]:
//     t ← st·t + ta·a + pt,   a ← sa·a + pa       (a read before its update; t: or null, then st is unused;
// ta / pa / pt: or null, adding 0). The frozen-head forwards fold each tile's products with it, and finish with it.
void rows_update(float* a, float* t, const float* pa, const float* pt, const float* sa, const float* st,
                 const float* ta, int64_t rows, int64_t D, cudaStream_t stream);

// cudaSuccess when this build holds a kernel image the current device can run (its machine code, or PTX the
// driver compiles for it); else the error, e.g. cudaErrorNoKernelImageForDevice. Launches nothing; the error
// is cleared, so that the next launch check does not report it.
cudaError_t kernel_image_status();

}  // namespace fastpref_cuda
