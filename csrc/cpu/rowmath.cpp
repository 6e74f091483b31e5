// Vectorizable per-row loops of the CPU backend (see rowmath.h).
#include "rowmath.h"

namespace fastpref_cpu {

FP_HOT float transform_row(float* x, const float* bias, int64_t n, Transform tr) {
  float mx = -std::numeric_limits<float>::infinity();
  if (bias != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) x[j] += bias[j];
  }
  if (tr.softcap) {
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < n; ++j) {
      float z = ftanh(x[j] * tr.inv_cap) * tr.cap_t;
      x[j] = z;
      mx = z > mx ? z : mx;
    }
  } else if (tr.inv_t != 1.0f) {
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < n; ++j) {
      float z = x[j] * tr.inv_t;
      x[j] = z;
      mx = z > mx ? z : mx;
    }
  } else {
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < n; ++j) mx = x[j] > mx ? x[j] : mx;
  }
  return mx;
}

// The terms are float32, their sums float64 (vector lanes of doubles, per block of SUM_BLOCK elements): a
// peaked row (one e ≈ 1 plus many small terms) loses tens of ulp with float32 accumulators, which shows
// in the KL's cross term.
static constexpr int64_t SUM_BLOCK = 128;

FP_HOT RowSums exp_sums_row(const float* z, int64_t n, float m, bool want_t, bool want_s2) {
  m = exp_base(m);
  double S = 0, Tt = 0, S2 = 0;
  for (int64_t b = 0; b < n; b += SUM_BLOCK) {
    const int64_t e_ = b + SUM_BLOCK < n ? b + SUM_BLOCK : n;
    double s = 0, t = 0, s2 = 0;
    if (want_t && want_s2) {
#pragma omp simd reduction(+ : s, t, s2)
      for (int64_t j = b; j < e_; ++j) {
        float d = z[j] - m, e = fexp(d);
        s += e;
        t += weighted(e, d);
        s2 += e * e;
      }
    } else if (want_t) {
#pragma omp simd reduction(+ : s, t)
      for (int64_t j = b; j < e_; ++j) {
        float d = z[j] - m, e = fexp(d);
        s += e;
        t += weighted(e, d);
      }
    } else if (want_s2) {
#pragma omp simd reduction(+ : s, s2)
      for (int64_t j = b; j < e_; ++j) {
        float e = fexp(z[j] - m);
        s += e;
        s2 += e * e;
      }
    } else {
#pragma omp simd reduction(+ : s)
      for (int64_t j = b; j < e_; ++j) s += fexp(z[j] - m);
    }
    S += s;
    Tt += t;
    S2 += s2;
  }
  return {static_cast<float>(S), static_cast<float>(Tt), static_cast<float>(S2)};
}

FP_HOT float cross_row(const float* w, const float* o, int64_t n, float mw, float* sum_e) {
  mw = exp_base(mw);
  double C = 0, S = 0;
  for (int64_t b = 0; b < n; b += SUM_BLOCK) {
    const int64_t e_ = b + SUM_BLOCK < n ? b + SUM_BLOCK : n;
    double c = 0, s = 0;
#pragma omp simd reduction(+ : c, s)
    for (int64_t j = b; j < e_; ++j) {
      float e = fexp(w[j] - mw);
      s += e;
      c += weighted(e, w[j] - o[j]);
    }
    C += c;
    S += s;
  }
  *sum_e = static_cast<float>(S);
  return static_cast<float>(C);
}

FP_HOT void stats_grad_row(float* x, const float* bias, int64_t n, Transform tr, float lse, float coef,
                           float g_ent, float ent) {
  if (bias != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) x[j] += bias[j];
  }
  if (tr.softcap) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      float c = ftanh(x[j] * tr.inv_cap);
      float lp = c * tr.cap_t - lse, p = fexp(lp);
      float dz = p * coef - g_ent * weighted(p, lp + ent);
      x[j] = dz * ((1.0f - c * c) * tr.inv_t);
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      float lp = x[j] * tr.inv_t - lse, p = fexp(lp);
      float dz = p * coef - g_ent * weighted(p, lp + ent);
      x[j] = dz * tr.inv_t;
    }
  }
}

// T/cap, so that c = tanh(x/cap) = z·T/cap for a transformed logit z (0 without softcap).
static inline float inv_cap_t_of(Transform tr) { return tr.softcap ? 1.0f / tr.cap_t : 0.0f; }

// dz/dx at a transformed logit z: 1/T, or (1 − c²)/T with c = z·T/cap (0 at a capped banned token, c = −1).
FP_INLINE float slope_at(float z, Transform tr, float inv_cap_t) {
  const float c = tr.softcap ? z * inv_cap_t : 0.0f;
  return (1.0f - c * c) * tr.inv_t;
}

FP_HOT void frozen_weights_row(float* z, float* t, int64_t n, float m, Transform tr) {
  m = exp_base(m);
  const float k = inv_cap_t_of(tr);
  if (t != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float d = z[j] - m, we = fexp(d) * slope_at(z[j], tr, k);
      t[j] = weighted(we, d);  // 0 at banned (−inf) tokens
      z[j] = we;
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) z[j] = fexp(z[j] - m) * slope_at(z[j], tr, k);
  }
}

FP_HOT void kl_frozen_weights_row(float* z, float* rz, int64_t n, float m, float rm, float mu, Transform tr,
                                  bool reverse) {
  m = exp_base(m);
  rm = exp_base(rm);
  const float k = inv_cap_t_of(tr);
  if (!reverse) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float s = slope_at(z[j], tr, k);
      rz[j] = fexp(rz[j] - rm) * s;
      z[j] = fexp(z[j] - m) * s;
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float we = fexp(z[j] - m) * slope_at(z[j], tr, k);
      rz[j] = weighted(we, (z[j] - rz[j]) - mu);  // 0 at banned (−inf) policy tokens
      z[j] = we;
    }
  }
}

FP_HOT void kl_grad_row(float* x, const float* bias, const float* rz, int64_t n, Transform tr, float lse,
                        float ref_lse, float kl, float g_kl, float g_logp, bool reverse) {
  if (bias != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) x[j] += bias[j];
  }
  // dzdx_j = (1 − c_j²)/T with softcap, else 1/T; z_j formed the same way as in transform_row.
  if (!reverse) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      float c = tr.softcap ? ftanh(x[j] * tr.inv_cap) : 0.0f;
      float z = tr.softcap ? c * tr.cap_t : x[j] * tr.inv_t;
      float d = tr.softcap ? (1.0f - c * c) * tr.inv_t : tr.inv_t;
      float p = fexp(z - lse), q = fexp(rz[j] - ref_lse);
      float dz = g_kl * (p - q) - g_logp * p;
      x[j] = dz * d;
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      float c = tr.softcap ? ftanh(x[j] * tr.inv_cap) : 0.0f;
      float z = tr.softcap ? c * tr.cap_t : x[j] * tr.inv_t;
      float d = tr.softcap ? (1.0f - c * c) * tr.inv_t : tr.inv_t;
      float lp = z - lse, lq = rz[j] - ref_lse, p = fexp(lp);
      float dz = g_kl * weighted(p, lp - lq - kl) - g_logp * p;
      x[j] = dz * d;
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// Two versions of one function, dispatched by the same ifunc rule as the target_clones of FP_HOT.
__attribute__((target("arch=x86-64-v3"))) static const char* simd_path_impl() { return "x86-64-v3"; }
__attribute__((target("default"))) static const char* simd_path_impl() { return "baseline"; }
const char* simd_path() { return simd_path_impl(); }
#else
const char* simd_path() { return "baseline"; }
#endif

}  // namespace fastpref_cpu
