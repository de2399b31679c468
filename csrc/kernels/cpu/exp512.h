// effx: exp(x) for x <= 0 on AVX-512 vectors, shared by the attention engine's AVX-512 variant
// and the bf16 kernels (bf16_gemm.cpp), within 1 ulp over the normal range: Cody-Waite
// reduction x = n ln2 + r, a degree-6 polynomial for exp(r), and vrndscaleps / vscalefps to
// round n and apply 2^n (2^n of a large negative n is 0, so -inf needs no mask).
#pragma once

#if defined(__x86_64__)
#include <immintrin.h>

namespace effx {
namespace cpu {

// GCC 12 takes the undefined pass-through operand inside its own intrinsics for an
// uninitialized variable.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
__attribute__((target("avx512f"))) inline __m512 exp512_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-110.0f));  // exp(-110) is below fp32; 2^-159 -> 0
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_fmadd_ps(r, _mm512_set1_ps(1.9875691500e-4f), _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}
#pragma GCC diagnostic pop

}  // namespace cpu
}  // namespace effx
#endif
