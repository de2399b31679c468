// effx family: group-wise asymmetric quantization, the per-group device routines shared by
// the quantize kernel (quant.cu) and the KIVI cache (kivi.cu); numerics as in
// include/effx/quant.h: scale rounded up to the storage dtype, codes against the stored scale.
#pragma once

#include <cfloat>
#include <cstdint>

#include "dtype.cuh"

namespace effx {
namespace cuda {

struct GroupCoder {
  float mn, inv;
};

// Min/max of the group's G values x(0) .. x(G - 1) (as floats), stores its scale and zero,
// returns the encoder.
template <typename T, int BITS, typename Get>
__device__ __forceinline__ GroupCoder group_params(Get x, int G, T* scale, T* zero) {
  constexpr float kMaxCode = static_cast<float>((1 << BITS) - 1);
  float mn = FLT_MAX, mx = -FLT_MAX;
  for (int i = 0; i < G; ++i) {
    const float v = x(i);
    mn = fminf(mn, v);
    mx = fmaxf(mx, v);
  }
  float sc = to_float(from_float_up<T>((mx - mn) / kMaxCode));
  const bool usable = sc >= FLT_MIN && sc <= FLT_MAX;
  sc = usable ? sc : 0.0f;
  *scale = from_float<T>(sc);
  *zero = from_float<T>(mn);
  return GroupCoder{mn, usable ? 1.0f / sc : 0.0f};
}

template <int BITS>
__device__ __forceinline__ uint32_t encode(float x, GroupCoder c) {
  constexpr float kMaxCode = static_cast<float>((1 << BITS) - 1);
  return __float2uint_rn(fminf(fmaxf((x - c.mn) * c.inv, 0.0f), kMaxCode));
}

// Quantizes one word-aligned group of G values x(i) (G * BITS a multiple of 32) into
// G * BITS / 32 words.
template <typename T, int BITS, typename Get>
__device__ __forceinline__ void quantize_values(Get x, int G, int32_t* words, T* scale, T* zero) {
  constexpr int kPerWord = 32 / BITS;
  const GroupCoder c = group_params<T, BITS>(x, G, scale, zero);
  for (int w = 0; w < G / kPerWord; ++w) {
    uint32_t acc = 0;
#pragma unroll
    for (int j = 0; j < kPerWord; ++j) acc |= encode<BITS>(x(w * kPerWord + j), c) << (BITS * j);
    words[w] = static_cast<int32_t>(acc);
  }
}

// The same for a contiguous group x[0, G).
template <typename T, int BITS>
__device__ __forceinline__ void quantize_group(const T* x, int G, int32_t* words, T* scale, T* zero) {
  quantize_values<T, BITS>([x](int i) { return to_float(x[i]); }, G, words, scale, zero);
}

}  // namespace cuda
}  // namespace effx
