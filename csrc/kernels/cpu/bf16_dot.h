// effx: bf16 dot-product GEMMs of the CPU attention engine (attention_engine.inc) for bf16
// caches on CPUs with AVX512-BF16. vdpbf16ps multiplies pairs of bf16 values and adds both
// products to one fp32 lane: twice the multiply-adds of an fp32 FMA per instruction, and the
// products of bf16 inputs are exact in fp32. Operands are packed so that the pair runs along
// the reduction dimension: keys as (k[t][2i], k[t][2i+1]) words, which a bf16 row already is;
// values as (v[2j][d], v[2j+1][d]) words, interleaving two rows; the probabilities are rounded
// to bf16 for P V, as flash attention does on GPUs. Micro-tiles: 6 rows x 32 columns, 12 zmm
// accumulators.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define EFFX_HAVE_BF16_DOT 1
#endif

namespace effx {
namespace cpu {
namespace bf16_dot {

// Packed operands of one thread, reused across blocks.
struct Workspace {
  std::vector<uint32_t> q, k, v, p;
};

#ifdef EFFX_HAVE_BF16_DOT

inline bool available() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
  return yes;
}

constexpr int kMR = 6, kLanes = 16, kNR = 2 * kLanes;

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")

// c[r][0, 32) (+)= sum_k a[r][k] . b[k][0, 32) over pair words; a rows at stride lda words,
// b as [pairs][32] words; rows past `mr` repeat row 0 and are not stored.
inline void tile(int64_t pairs, const uint32_t* a, int64_t lda, int mr, const uint32_t* b, float* c, int64_t ldc,
                 int nc, bool accumulate, float scale) {
  __m512 acc[kMR][2];
  const uint32_t* row[kMR];
  for (int r = 0; r < kMR; ++r) {
    row[r] = a + (r < mr ? r : 0) * lda;
    acc[r][0] = _mm512_setzero_ps();
    acc[r][1] = _mm512_setzero_ps();
  }
  for (int64_t kk = 0; kk < pairs; ++kk) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + kk * kNR);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + kk * kNR + kLanes);
#pragma GCC unroll 6
    for (int r = 0; r < kMR; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(row[r][kk]));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
    }
  }
  const __mmask16 m0 = static_cast<__mmask16>(nc >= kLanes ? 0xffff : (1u << nc) - 1u);
  const __mmask16 m1 = static_cast<__mmask16>(nc >= kNR ? 0xffff : (nc > kLanes ? (1u << (nc - kLanes)) - 1u : 0u));
  const __m512 s = _mm512_set1_ps(scale);
  for (int r = 0; r < mr; ++r) {
    float* cr = c + r * ldc;
    __m512 x0 = _mm512_mul_ps(acc[r][0], s), x1 = _mm512_mul_ps(acc[r][1], s);
    if (accumulate) {
      x0 = _mm512_add_ps(x0, _mm512_maskz_loadu_ps(m0, cr));
      x1 = _mm512_add_ps(x1, _mm512_maskz_loadu_ps(m1, cr + kLanes));
    }
    _mm512_mask_storeu_ps(cr, m0, x0);
    _mm512_mask_storeu_ps(cr + kLanes, m1, x1);
  }
}

// Rows of fp32 as bf16 pair words (round to nearest even), `n` values a row, zero-padded to
// an even count.
inline void pairs_of(const float* x, int64_t ldx, int64_t rows, int64_t n, uint32_t* out, int64_t ldo) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ldx;
    uint32_t* o = out + r * ldo;
    int64_t j = 0;
    for (; j + 32 <= n; j += 32) {
      const __m512bh h = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(xr + j + 16), _mm512_loadu_ps(xr + j));
      _mm512_storeu_si512(o + j / 2, (__m512i)h);
    }
    for (; j < n; j += 2) {
      const float lo = xr[j], hi = j + 1 < n ? xr[j + 1] : 0.0f;
      const __m128bh h = _mm_cvtneps_pbh(_mm_setr_ps(lo, hi, 0.0f, 0.0f));
      uint32_t w;
      std::memcpy(&w, &h, 4);
      o[j / 2] = w;
    }
  }
}

// s[r * lds + j] = scale * q_r . k_j: q [rows][D] and k [tokens][D] bf16 bit patterns at
// strides ldq / ldk (elements), D even.
inline void scores(int64_t rows, int64_t tokens, int64_t D, const uint16_t* q, int64_t ldq, const uint16_t* k,
                   int64_t ldk, float scale, float* s, int64_t lds, Workspace& ws) {
  const int64_t pairs = D / 2, panels = (tokens + kNR - 1) / kNR;
  ws.k.assign(panels * pairs * kNR, 0u);  // [panel][pair][32 tokens]: a key row is its pairs
  for (int64_t j = 0; j < tokens; ++j) {
    const uint16_t* kr = k + j * ldk;
    uint32_t* dst = ws.k.data() + (j / kNR) * pairs * kNR + j % kNR;
    for (int64_t kk = 0; kk < pairs; ++kk) {
      uint32_t w;
      std::memcpy(&w, kr + 2 * kk, 4);
      dst[kk * kNR] = w;
    }
  }
  for (int64_t r0 = 0; r0 < rows; r0 += kMR) {
    const int mr = static_cast<int>(std::min<int64_t>(kMR, rows - r0));
    for (int64_t p = 0; p < panels; ++p) {
      tile(pairs, reinterpret_cast<const uint32_t*>(q + r0 * ldq), ldq / 2, mr, ws.k.data() + p * pairs * kNR,
           s + r0 * lds + p * kNR, lds, static_cast<int>(std::min<int64_t>(kNR, tokens - p * kNR)), false, scale);
    }
  }
}

// acc[r * ldo + d] += sum_j p[r * ldp + j] v_j[d]: v [tokens][D] bf16 bit patterns at stride ldv.
inline void accumulate(int64_t rows, int64_t tokens, int64_t D, const float* p, int64_t ldp, const uint16_t* v,
                       int64_t ldv, float* acc, int64_t ldo, Workspace& ws) {
  const int64_t pairs = (tokens + 1) / 2, panels = (D + kNR - 1) / kNR;
  ws.p.resize(rows * pairs);
  pairs_of(p, ldp, rows, tokens, ws.p.data(), pairs);
  ws.v.assign(panels * pairs * kNR, 0u);  // [panel][token pair][32 channels]: rows 2j, 2j + 1 interleaved
  for (int64_t jj = 0; jj < pairs; ++jj) {
    const uint16_t* lo = v + 2 * jj * ldv;
    const uint16_t* hi = 2 * jj + 1 < tokens ? lo + ldv : nullptr;
    for (int64_t d = 0; d < D; ++d) {
      ws.v[(d / kNR) * pairs * kNR + jj * kNR + d % kNR] = lo[d] | (hi ? static_cast<uint32_t>(hi[d]) << 16 : 0u);
    }
  }
  for (int64_t r0 = 0; r0 < rows; r0 += kMR) {
    const int mr = static_cast<int>(std::min<int64_t>(kMR, rows - r0));
    for (int64_t q = 0; q < panels; ++q) {
      tile(pairs, ws.p.data() + r0 * pairs, pairs, mr, ws.v.data() + q * pairs * kNR, acc + r0 * ldo + q * kNR, ldo,
           static_cast<int>(std::min<int64_t>(kNR, D - q * kNR)), true, 1.0f);
    }
  }
}

#pragma GCC pop_options

#else

inline bool available() { return false; }
inline void scores(int64_t, int64_t, int64_t, const uint16_t*, int64_t, const uint16_t*, int64_t, float, float*,
                   int64_t, Workspace&) {}
inline void accumulate(int64_t, int64_t, int64_t, const float*, int64_t, const uint16_t*, int64_t, float*, int64_t,
                       Workspace&) {}

#endif

}  // namespace bf16_dot
}  // namespace cpu
}  // namespace effx
