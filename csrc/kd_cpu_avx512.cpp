// kd_cpu_avx512.cpp -- AVX-512 rows of the fused forward-KL chunk pass (see kd_cpu.cpp for the math).
//
// This translation unit includes no torch header: its functions carry
// __attribute__((target("avx512f,..."))) and run only after kd_cpu.cpp checked the CPU at run time,
// so no inline function compiled here with AVX-512 can be picked by the linker for code that runs
// on a CPU without it. The rest of the extension is built for the baseline ISA.
#if defined(__x86_64__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 false positive inside avx512fintrin.h
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <cmath>
#include <cstdint>

#define MINITRON_AVX512 __attribute__((target("avx512f,avx512dq,fma")))

namespace {

// exp(x) for x <= 0 (every argument here is a logit minus its row's log-sum-exp or max):
// Cephes expf (n = round(x / ln 2), r = x - n ln 2 in two parts, degree-7 polynomial, 2^n by
// scalef); about 1 ulp on [-87.3, 0]. Below -87.34 (fp32 underflow) and for -inf it returns
// exactly 0, which the KL mask relies on; NaN stays NaN.
MINITRON_AVX512 inline __m512 exp_nonpos(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.33654f);
  const __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  const __m512 xc = _mm512_max_ps(x, lo);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  __m512 y = _mm512_scalef_ps(p, n);
  y = _mm512_mask_mov_ps(y, under, _mm512_setzero_ps());
  return _mm512_mask_mov_ps(y, nan, x);
}

// fp32 lanes added into two fp64 accumulators (a row sums 49152 terms: fp32 lanes would lose ~1e-5)
MINITRON_AVX512 inline void add_pd(__m512d& a0, __m512d& a1, __m512 v) {
  a0 = _mm512_add_pd(a0, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
  a1 = _mm512_add_pd(a1, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
}

inline __mmask16 tail_mask(int64_t left) { return static_cast<__mmask16>((1u << left) - 1u); }

MINITRON_AVX512 float row_max(const float* x, int64_t n) {
  const __m512 ninf = _mm512_set1_ps(-INFINITY);
  __m512 m = ninf;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(x + j));
  if (j < n) m = _mm512_max_ps(m, _mm512_mask_loadu_ps(ninf, tail_mask(n - j), x + j));
  return _mm512_reduce_max_ps(m);
}

// log sum_j exp(x_j * inv_tau - shift) + shift
MINITRON_AVX512 float row_lse(const float* x, int64_t n, float inv_tau, float shift) {
  const __m512 vinv = _mm512_set1_ps(inv_tau), vshift = _mm512_set1_ps(shift), ninf = _mm512_set1_ps(-INFINITY);
  __m512d a0 = _mm512_setzero_pd(), a1 = _mm512_setzero_pd();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) add_pd(a0, a1, exp_nonpos(_mm512_fmsub_ps(_mm512_loadu_ps(x + j), vinv, vshift)));
  if (j < n) {  // masked-out lanes load -inf: exp gives 0
    const __m512 v = _mm512_mask_loadu_ps(ninf, tail_mask(n - j), x + j);
    add_pd(a0, a1, exp_nonpos(_mm512_fmsub_ps(v, vinv, vshift)));
  }
  return static_cast<float>(std::log(_mm512_reduce_add_pd(_mm512_add_pd(a0, a1)))) + shift;
}

}  // namespace

// Rows [r0, r1) of a (c, v) chunk: loss[r] = tau^2 KL(P || Q); with row_scale, s[r] <- tau row_scale[r] (Q - P).
extern "C" MINITRON_AVX512 void minitron_kd_fkl_rows_avx512(float* s, const float* t, const float* row_scale,
                                                            float* loss, int64_t r0, int64_t r1, int64_t v,
                                                            float tau) {
  const float inv_tau = 1.f / tau;
  const __m512 vinv = _mm512_set1_ps(inv_tau), zero = _mm512_setzero_ps(), ninf = _mm512_set1_ps(-INFINITY);
  for (int64_t r = r0; r < r1; ++r) {
    float* srow = s + r * v;
    const float* trow = t + r * v;
    const float ms = row_max(srow, v) * inv_tau, mt = row_max(trow, v) * inv_tau;
    const __m512 vls = _mm512_set1_ps(row_lse(srow, v, inv_tau, ms));
    const __m512 vlt = _mm512_set1_ps(row_lse(trow, v, inv_tau, mt));
    const __m512 vg = _mm512_set1_ps(row_scale ? tau * row_scale[r] : 0.f);
    __m512d a0 = _mm512_setzero_pd(), a1 = _mm512_setzero_pd();
    for (int64_t j = 0; j < v; j += 16) {
      const bool full = j + 16 <= v;
      const __mmask16 m = full ? static_cast<__mmask16>(0xFFFF) : tail_mask(v - j);
      const __m512 ls = _mm512_fmsub_ps(_mm512_mask_loadu_ps(ninf, m, srow + j), vinv, vls);  // log Q
      const __m512 lt = _mm512_fmsub_ps(_mm512_mask_loadu_ps(ninf, m, trow + j), vinv, vlt);  // log P
      const __m512 p = exp_nonpos(lt);
      // P = 0 entries (teacher -inf, padding, masked lanes) contribute 0, never 0 * inf = NaN
      const __mmask16 pos = _mm512_cmp_ps_mask(p, zero, _CMP_NEQ_UQ);  // p != 0, NaN included (it propagates)
      add_pd(a0, a1, _mm512_maskz_mul_ps(pos, p, _mm512_sub_ps(lt, ls)));
      if (row_scale) _mm512_mask_storeu_ps(srow + j, m, _mm512_mul_ps(_mm512_sub_ps(exp_nonpos(ls), p), vg));
    }
    loss[r] = static_cast<float>(_mm512_reduce_add_pd(_mm512_add_pd(a0, a1))) * tau * tau;
  }
}

#endif  // __x86_64__
