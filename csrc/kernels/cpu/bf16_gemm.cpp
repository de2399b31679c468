// effx: the AVX512_BF16 GEMM of bf16_gemm.h. Every function that uses the instruction carries
// its target attribute, and none runs unless available() said so.
#include "bf16_gemm.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace effx {
namespace cpu {
namespace bf16 {

#if defined(__x86_64__) && defined(__GNUC__)
#define EFFX_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

bool available() {
  const char* cap = std::getenv("EFFX_CPU_ISA");
  return (cap == nullptr || std::strcmp(cap, "avx512bf16") == 0) && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512bf16");
}

void pack_columns(int64_t N, int64_t KP, const BFloat16* rows, int64_t ld, uint32_t* out) {
  for (int64_t q0 = 0; q0 < N; q0 += kPanel) {
    uint32_t* panel = out + q0 * KP;
    const int64_t nq = std::min(kPanel, N - q0);
    for (int64_t j = 0; j < kPanel; ++j) {
      if (j < nq) {
        const BFloat16* row = rows + (q0 + j) * ld;
        for (int64_t p = 0; p < KP; ++p) std::memcpy(panel + p * kPanel + j, row + 2 * p, 4);
      } else {
        for (int64_t p = 0; p < KP; ++p) panel[p * kPanel + j] = 0;
      }
    }
  }
}

EFFX_BF16_TARGET void pack_rows(int64_t K, int64_t N, const BFloat16* rows, int64_t ld, uint32_t* out) {
  // Interleaving two rows of 16 columns into 16 pairs: lanes 0-15 of the 32 16-bit lanes are row 2p's,
  // 16-31 row 2p+1's; the result takes column j of each in turn.
  __m512i idx;
  alignas(64) uint16_t order[32];
  for (int j = 0; j < 16; ++j) {
    order[2 * j] = static_cast<uint16_t>(j);
    order[2 * j + 1] = static_cast<uint16_t>(32 + j);
  }
  std::memcpy(&idx, order, sizeof idx);
  const int64_t KP = (K + 1) / 2;
  for (int64_t p = 0; p < KP; ++p) {
    const BFloat16* r0 = rows + 2 * p * ld;
    const BFloat16* r1 = 2 * p + 1 < K ? r0 + ld : nullptr;
    for (int64_t q0 = 0; q0 < N; q0 += kPanel) {
      uint32_t* dst = out + q0 * KP + p * kPanel;
      const int64_t nq = std::min(kPanel, N - q0);
      for (int64_t h = 0; h < kPanel; h += 16) {
        const int64_t w = std::max<int64_t>(0, std::min<int64_t>(16, nq - h));
        const __mmask32 m = static_cast<__mmask32>((uint64_t{1} << w) - 1);
        const __m512i a = _mm512_castsi256_si512(_mm256_maskz_loadu_epi16(m, r0 + q0 + h));
        const __m512i b = r1 ? _mm512_castsi256_si512(_mm256_maskz_loadu_epi16(m, r1 + q0 + h)) : _mm512_setzero_si512();
        _mm512_storeu_si512(dst + h, _mm512_permutex2var_epi16(a, idx, b));
      }
    }
  }
}

EFFX_BF16_TARGET void round_to_bf16(const float* src, int64_t n, int64_t n_padded, BFloat16* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + i));
    std::memcpy(dst + i, &h, sizeof h);
  }
  for (; i < n; ++i) dst[i] = from_float<BFloat16>(src[i]);
  for (; i < n_padded; ++i) dst[i].bits = 0;
}

namespace {

constexpr int kRows = 6;  // rows per tile: 12 accumulators, two B vectors and a broadcast in 32 zmm

template <int MR>
EFFX_BF16_TARGET void tile(int64_t KP, const uint32_t* a, int64_t lda, const uint32_t* bp, float alpha, float* c,
                           int64_t ldc, int64_t nr, bool accumulate) {
  __m512 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < KP; ++p) {
    const __m512bh b0 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(bp + p * kPanel));
    const __m512bh b1 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(bp + p * kPanel + 16));
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m512bh av = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(a[r * lda + p])));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
    }
  }
  const __mmask16 m0 = static_cast<__mmask16>((uint32_t{1} << std::min<int64_t>(16, nr)) - 1);
  const __mmask16 m1 = static_cast<__mmask16>((uint32_t{1} << std::max<int64_t>(0, nr - 16)) - 1);
  for (int r = 0; r < MR; ++r) {
    float* cr = c + r * ldc;
    const __m512 scale = _mm512_set1_ps(alpha);
    __m512 v0 = _mm512_mul_ps(acc[r][0], scale), v1 = _mm512_mul_ps(acc[r][1], scale);
    if (accumulate) {
      v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, cr));
      v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, cr + 16));
    }
    _mm512_mask_storeu_ps(cr, m0, v0);
    _mm512_mask_storeu_ps(cr + 16, m1, v1);
  }
}

}  // namespace

void gemm(int64_t M, int64_t N, int64_t KP, const uint32_t* a, int64_t lda, const uint32_t* packed, float alpha,
          float* c, int64_t ldc, bool accumulate) {
  for (int64_t m0 = 0; m0 < M; m0 += kRows) {
    const int64_t mr = std::min<int64_t>(kRows, M - m0);
    for (int64_t q0 = 0; q0 < N; q0 += kPanel) {
      const uint32_t* bp = packed + q0 * KP;
      const uint32_t* am = a + m0 * lda;
      float* cm = c + m0 * ldc + q0;
      const int64_t nr = std::min(kPanel, N - q0);
      switch (mr) {
        case 6: tile<6>(KP, am, lda, bp, alpha, cm, ldc, nr, accumulate); break;
        case 5: tile<5>(KP, am, lda, bp, alpha, cm, ldc, nr, accumulate); break;
        case 4: tile<4>(KP, am, lda, bp, alpha, cm, ldc, nr, accumulate); break;
        case 3: tile<3>(KP, am, lda, bp, alpha, cm, ldc, nr, accumulate); break;
        case 2: tile<2>(KP, am, lda, bp, alpha, cm, ldc, nr, accumulate); break;
        default: tile<1>(KP, am, lda, bp, alpha, cm, ldc, nr, accumulate); break;
      }
    }
  }
}

#else  // no AVX512_BF16 on this architecture: available() is false and nothing else is called

bool available() { return false; }
void pack_columns(int64_t, int64_t, const BFloat16*, int64_t, uint32_t*) { std::abort(); }
void pack_rows(int64_t, int64_t, const BFloat16*, int64_t, uint32_t*) { std::abort(); }
void round_to_bf16(const float*, int64_t, int64_t, BFloat16*) { std::abort(); }
void gemm(int64_t, int64_t, int64_t, const uint32_t*, int64_t, const uint32_t*, float, float*, int64_t, bool) {
  std::abort();
}

#endif

}  // namespace bf16
}  // namespace cpu
}  // namespace effx
