// effx: AVX-512 math shared by the attention engine's AVX-512 variant and the bf16 kernels
// (bf16_gemm.cpp).
// exp2_512_nonpositive: 2^x for x <= 0, within 0.8 ulp over the normal range: vrndscaleps
// splits x = n + f with |f| <= 1/2, a degree-6 minimax polynomial gives 2^f, and vscalefps
// applies 2^n (2^n of a large negative n is 0, so -inf needs no mask). The engine's softmax
// runs in base 2 (its scores carry the factor log2 e), which saves the ln 2 reduction of an
// exp(x): 10 instructions instead of 14.
// lanes_sum512 / lanes_max512: a vector's 16 lanes reduced in four rounds of swapped halves,
// not a chain of 16 dependent operations (rows of 128 scores on one Xeon core: the row maximum
// 1.08 -> 0.78 ns a vector).
#pragma once

#if defined(__x86_64__)
#include <immintrin.h>

namespace effx {
namespace cpu {

// GCC 12 takes the undefined pass-through operand inside its own intrinsics for an
// uninitialized variable.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
__attribute__((target("avx512f"))) inline __m512 exp2_512_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-160.0f));  // 2^-160 is below fp32: scalef gives 0
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_fmadd_ps(f, _mm512_set1_ps(1.4902517e-4f), _mm512_set1_ps(1.3389582e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.620018e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550365e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022637e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// The zero-masked forms throughout: the plain ones read an undefined vector GCC 12 warns about.
__attribute__((target("avx512f"))) inline float lanes_sum512(__m512 v) {
  v = _mm512_maskz_add_ps(0xffff, v, _mm512_maskz_shuffle_f32x4(0xffff, v, v, 0x4e));
  v = _mm512_maskz_add_ps(0xffff, v, _mm512_maskz_shuffle_f32x4(0xffff, v, v, 0xb1));
  v = _mm512_maskz_add_ps(0xffff, v, _mm512_maskz_permute_ps(0xffff, v, 0x4e));
  v = _mm512_maskz_add_ps(0xffff, v, _mm512_maskz_permute_ps(0xffff, v, 0xb1));
  return _mm512_cvtss_f32(v);
}

__attribute__((target("avx512f"))) inline float lanes_max512(__m512 v) {
  v = _mm512_maskz_max_ps(0xffff, v, _mm512_maskz_shuffle_f32x4(0xffff, v, v, 0x4e));
  v = _mm512_maskz_max_ps(0xffff, v, _mm512_maskz_shuffle_f32x4(0xffff, v, v, 0xb1));
  v = _mm512_maskz_max_ps(0xffff, v, _mm512_maskz_permute_ps(0xffff, v, 0x4e));
  v = _mm512_maskz_max_ps(0xffff, v, _mm512_maskz_permute_ps(0xffff, v, 0xb1));
  return _mm512_cvtss_f32(v);
}
#pragma GCC diagnostic pop

}  // namespace cpu
}  // namespace effx
#endif
