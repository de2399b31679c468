// effx SIMT emulator: the bf16 storage type (the top half of an fp32) and its conversions.
#pragma once

#include <cstdint>
#include <cstring>

#include "simt.h"

struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}

// Toward +inf: positive values with dropped bits go up one step; negative ones truncate.
inline __nv_bfloat16 __float2bfloat16_ru(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x40u)};
  const bool up = (u & 0xffffu) != 0 && !(u >> 31);
  return __nv_bfloat16{static_cast<uint16_t>((u >> 16) + (up ? 1u : 0u))};
}

inline __nv_bfloat16 __float2bfloat16(float x) { return __float2bfloat16_rn(x); }
