// Per-row epilogue math for the CPU backend: float32 only, plain loops that GCC vectorizes.
//
// The hot functions are compiled twice (x86-64-v3, i.e. AVX2+FMA, and baseline x86-64) through target_clones
// and picked at load time, so the extension runs on any x86-64 CPU and uses AVX2 where it exists. The clone
// is named by ISA level, not by processor: GCC resolves "arch=haswell" with __builtin_cpu_is, so AMD CPUs
// (Zen) got the baseline SSE2 clone; "arch=x86-64-v3" is resolved by feature. simd_path() reports the pick. exp and tanh are
// branch-free polynomial versions (a few ulp) so that the loops vectorize; the reductions use
// `omp simd reduction`, which allows reordering the sums across lanes. Compile with -fopenmp
// -fno-trapping-math (setup.py does): under GCC's default -ftrapping-math the selects below are not
// if-converted and no loop vectorizes.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FP_HOT __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FP_HOT
#endif
#define FP_INLINE static inline __attribute__((always_inline))

namespace fastpref_cpu {

// exp(x), relative error about 2 ulp on [-87, 88]; 0 below -87.3 (where float32 exp is denormal or 0).
FP_INLINE float fexp(float x) {
  const float lo = -87.3f, hi = 88.3f;
  float xc = x < lo ? lo : (x > hi ? hi : x);
  // n = round(x / ln 2) by the 1.5·2^23 trick (vectorizes without SSE4.1 rounding instructions)
  const float magic = 12582912.0f;
  float n = (xc * 1.44269504088896341f + magic) - magic;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  float y = p * scale;
  return x < lo ? 0.0f : y;
}

// tanh(x) = sign(x)·(1 − 2/(e^{2|x|} + 1)); absolute error about 1e-7.
FP_INLINE float ftanh(float x) {
  float a = x < 0.0f ? -x : x;
  float e = fexp(2.0f * (a > 44.0f ? 44.0f : a));
  float t = 1.0f - 2.0f / (e + 1.0f);
  return x < 0.0f ? -t : t;
}

// e·x, or 0 where that is NaN: a banned token (bias −inf) has e = 0 and x = ±inf or NaN, and 0·(±inf) is NaN.
// (A NaN test rather than e > 0: GCC then keeps every load unconditional and vectorizes the baseline clone too.)
FP_INLINE float weighted(float e, float x) {
  const float ex = e * x;
  return ex == ex ? ex : 0.0f;
}

// The max to subtract from a row's logits: 0 while all of them are −inf (banned tokens), where
// exp(−inf − (−inf)) would be NaN; the exps are then 0 as they should be.
FP_INLINE float exp_base(float m) { return m == -std::numeric_limits<float>::infinity() ? 0.0f : m; }

// How raw GEMM outputs x (plus bias) become logits: z = softcap ? cap·tanh(x/cap)/T : x/T.
struct Transform {
  bool softcap;
  float inv_cap;  // 1/cap
  float cap_t;    // cap/T
  float inv_t;    // 1/T
};

// Defined in rowmath.cpp with FP_HOT (the declarations here carry no target attribute, so callers in
// other files call the ifunc symbol that picks the clone).
// x[j] ← z_j for one row of `n` raw logits (bias may be null); returns max_j z_j.
float transform_row(float* x, const float* bias, int64_t n, Transform tr);

struct RowSums {
  float s, t, s2;
};
// Σ e_j, Σ e_j·d_j, Σ e_j² with d_j = z_j − m, e_j = exp(d_j); t / s2 only when asked. −inf entries add 0.
RowSums exp_sums_row(const float* z, int64_t n, float m, bool want_t, bool want_s2);

// Σ exp(w_j − mw)·(w_j − o_j) — the cross term of the KL, weighted by the softmax of w.
float cross_row(const float* w, const float* o, int64_t n, float mw, float* sum_e);

// Backward of token_stats for one row: x holds the raw GEMM output, on return dL/dx (bias / softcap /
// temperature included). dz_j = p_j·coef − g_ent·p_j·(log p_j + H), p_j = exp(z_j − lse).
void stats_grad_row(float* x, const float* bias, int64_t n, Transform tr, float lse, float coef,
                           float g_ent, float ent);

// Backward of token_kl for one row: x (policy raw logits) ← dL/dx, rz holds the reference logits
// (already transformed). forward: dz = g_kl·(p − q) − g_logp·p; reverse: dz = g_kl·p·(lp − lq − kl) − g_logp·p.
void kl_grad_row(float* x, const float* bias, const float* rz, int64_t n, Transform tr, float lse,
                        float ref_lse, float kl, float g_kl, float g_logp, bool reverse);

// Frozen heads, one row of logits z (transformed): z[j] ← e_j·dz/dx_j and, when t is not null,
// t[j] ← e_j·dz/dx_j·(z_j − m), with e_j = exp(z_j − m) (0 where z_j = −inf).
void frozen_weights_row(float* z, float* t, int64_t n, float m, Transform tr);

// Frozen policy head in token_kl, one row: z (policy) and rz (reference) hold transformed logits, s_j = dz/dx_j
// of the policy, e_j = exp(z_j − m), r_j = exp(rz_j − rm). On return z[j] ← e_j·s_j and
//     forward: rz[j] ← r_j·s_j          reverse: rz[j] ← e_j·s_j·(z_j − rz_j − mu)    (0 where e_j = 0).
void kl_frozen_weights_row(float* z, float* rz, int64_t n, float m, float rm, float mu, Transform tr,
                           bool reverse);

// dz/dx at one raw value (label fix-ups).
inline float dzdx_at(float raw, Transform tr) {
  if (!tr.softcap) return tr.inv_t;
  float c = ftanh(raw * tr.inv_cap);
  return (1.0f - c * c) * tr.inv_t;
}
inline float z_at(float raw, Transform tr) {
  return tr.softcap ? ftanh(raw * tr.inv_cap) * tr.cap_t : raw * tr.inv_t;
}

// Which clone the loader picked for this CPU: "x86-64-v3" or "baseline" (same resolver as FP_HOT).
const char* simd_path();

}  // namespace fastpref_cpu
