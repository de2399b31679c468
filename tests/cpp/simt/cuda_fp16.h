// effx SIMT emulator: the fp16 storage type and the conversions the kernels use, rounded by the
// CPU's F16C unit (IEEE binary16, the GPU's format).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "simt.h"

struct __half {
  uint16_t bits;
};

inline float __half2float(__half h) { return _cvtsh_ss(h.bits); }
inline __half __float2half_rn(float x) { return __half{static_cast<uint16_t>(_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT))}; }
inline __half __float2half_ru(float x) { return __half{static_cast<uint16_t>(_cvtss_sh(x, _MM_FROUND_TO_POS_INF))}; }
inline __half __float2half_rd(float x) { return __half{static_cast<uint16_t>(_cvtss_sh(x, _MM_FROUND_TO_NEG_INF))}; }
inline __half __float2half_rz(float x) { return __half{static_cast<uint16_t>(_cvtss_sh(x, _MM_FROUND_TO_ZERO))}; }
inline __half __float2half(float x) { return __float2half_rn(x); }
