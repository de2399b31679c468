// effx family: group-wise asymmetric quantization. The per-span CPU routines shared by the
// quantize/dequantize ops (quant.cpp) and the KIVI cache (kivi.cpp): a span is a run of whole
// groups that starts on a word boundary (layout in include/effx/quant.h).
#pragma once

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <limits>

#include "effx/dtype.h"

namespace effx {
namespace cpu {

// Round to nearest even for 0 <= v < 2^22 without a libm call, so the loop vectorizes with
// plain SSE2: adding 1.5 * 2^23 pushes the fraction out of the mantissa.
inline float round_small_nonnegative(float v) {
  constexpr float kMagic = 12582912.0f;
  return (v + kMagic) - kMagic;
}

// Quantizes x[0, n) (n a multiple of G) into ceil(n / (32 / BITS)) words at `codes` and
// n / G scales and zeros. Scratch: `values` holds n floats, `q` n + 32 / BITS codes.
template <typename T, int BITS>
void quantize_span(const T* x, int64_t n, int64_t G, int32_t* codes, T* scale, T* zero,
                   float* values, uint32_t* q) {
  constexpr int kPerWord = 32 / BITS;
  constexpr float kMaxCode = static_cast<float>((1 << BITS) - 1);
  for (int64_t g0 = 0; g0 < n; g0 += G) {
    float* v = values + g0;
    float mn = std::numeric_limits<float>::infinity();
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < G; ++i) {
      const float xi = to_float(x[g0 + i]);
      v[i] = xi;
      mn = xi < mn ? xi : mn;
      mx = xi > mx ? xi : mx;
    }
    float sc = to_float(from_float_up<T>((mx - mn) / kMaxCode));
    const bool usable = sc >= FLT_MIN && sc <= FLT_MAX;
    sc = usable ? sc : 0.0f;
    const float inv = usable ? 1.0f / sc : 0.0f;
    scale[g0 / G] = from_float<T>(sc);
    zero[g0 / G] = from_float<T>(mn);
    uint32_t* qg = q + g0;
    for (int64_t i = 0; i < G; ++i) {
      float c = (v[i] - mn) * inv;
      c = c < 0.0f ? 0.0f : c;
      c = c > kMaxCode ? kMaxCode : c;
      qg[i] = static_cast<uint32_t>(static_cast<int32_t>(round_small_nonnegative(c)));
    }
  }
  // Codes past the end pad the last word with zeros.
  std::fill(q + n, q + n + kPerWord, 0u);
  const int64_t words = (n + kPerWord - 1) / kPerWord;
  for (int64_t w = 0; w < words; ++w) {
    uint32_t acc = 0;
    for (int j = 0; j < kPerWord; ++j) acc |= q[w * kPerWord + j] << (BITS * j);
    codes[w] = static_cast<int32_t>(acc);
  }
}

// out[j] = code_j * scale[j / G] + zero[j / G] for j in [0, n), codes starting on a word.
template <typename P, typename O, int BITS>
void dequantize_span(const int32_t* codes, int64_t n, int64_t G, const P* scale, const P* zero,
                     O* out) {
  constexpr int kPerWord = 32 / BITS;
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  for (int64_t g0 = 0; g0 < n; g0 += G) {
    const float sc = to_float(scale[g0 / G]);
    const float mn = to_float(zero[g0 / G]);
    if (G % kPerWord == 0) {  // whole words per group: constant shifts, no division per value
      const int32_t* w = codes + g0 / kPerWord;
      O* o = out + g0;
      for (int64_t i = 0; i < G / kPerWord; ++i) {
        const uint32_t word = static_cast<uint32_t>(w[i]);
        for (int j = 0; j < kPerWord; ++j) {
          o[i * kPerWord + j] = from_float<O>(static_cast<float>((word >> (BITS * j)) & kMask) * sc + mn);
        }
      }
      continue;
    }
    for (int64_t j = g0; j < g0 + G; ++j) {
      const uint32_t word = static_cast<uint32_t>(codes[j / kPerWord]);
      const uint32_t c = (word >> (BITS * (j % kPerWord))) & kMask;
      out[j] = from_float<O>(static_cast<float>(c) * sc + mn);
    }
  }
}

}  // namespace cpu
}  // namespace effx
