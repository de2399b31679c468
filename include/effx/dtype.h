// effx: storage dtypes shared by every torch-free kernel, and exact fp16/bf16 <-> fp32
// conversions for the CPU kernels (the CUDA kernels use cuda_fp16.h / cuda_bf16.h).
#pragma once

#include <cstdint>
#include <cstring>

namespace effx {

// Float64 is accepted only by the families that document it (Monarch, Pixelfly: CPU, for
// gradcheck); every other kernel takes the first three.
enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2, Float64 = 3 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::Float32: return "float32";
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
    case DType::Float64: return "float64";
  }
  return "unknown";
}

inline int dtype_size(DType t) {
  return t == DType::Float64 ? 8 : (t == DType::Float32 ? 4 : 2);
}

// Storage types on the host: 16-bit payloads with no arithmetic, so that kernels convert
// once to fp32, compute, and convert back (accumulation is always fp32).
struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

inline uint32_t float_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float bits_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline float to_float(float x) { return x; }

inline float to_float(Half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t em = h.bits & 0x7fffu;
  if (em >= 0x7c00u) return bits_float(sign | 0x7f800000u | ((em & 0x3ffu) << 13));  // inf, nan
  if (em >= 0x0400u) return bits_float(sign | ((em << 13) + ((127u - 15u) << 23)));  // normal
  return bits_float(sign | float_bits(static_cast<float>(em) * 5.9604644775390625e-8f));  // 2^-24
}

inline float to_float(BFloat16 b) { return bits_float(static_cast<uint32_t>(b.bits) << 16); }

template <typename T> inline T from_float(float x);

template <> inline float from_float<float>(float x) { return x; }

// Round to nearest even, overflow to inf, nan stays nan, subnormals exact.
template <> inline Half from_float<Half>(float x) {
  uint32_t f = float_bits(x);
  const uint16_t sign = static_cast<uint16_t>((f >> 16) & 0x8000u);
  f &= 0x7fffffffu;
  if (f >= 0x47800000u) return Half{static_cast<uint16_t>(sign | (f > 0x7f800000u ? 0x7e00u : 0x7c00u))};
  if (f < 0x38800000u) {
    // Below the smallest normal: adding 0.5 lets the FPU do the rounding into the low bits.
    const float shifted = bits_float(f) + 0.5f;
    return Half{static_cast<uint16_t>(sign | (float_bits(shifted) - 0x3f000000u))};
  }
  const uint32_t odd = (f >> 13) & 1u;
  f += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + odd;
  return Half{static_cast<uint16_t>(sign | (f >> 13))};
}

template <> inline BFloat16 from_float<BFloat16>(float x) {
  const uint32_t f = float_bits(x);
  if ((f & 0x7fffffffu) > 0x7f800000u) return BFloat16{static_cast<uint16_t>((f >> 16) | 0x40u)};
  return BFloat16{static_cast<uint16_t>((f + 0x7fffu + ((f >> 16) & 1u)) >> 16)};
}

// Smallest value of T that is >= x, for finite x >= 0: a quantization scale rounded up keeps
// (max - min) / scale <= 2^bits - 1, so no value is clamped and every one lies within half a
// step of its dequantized value.
template <typename T> inline T from_float_up(float x) {
  T t = from_float<T>(x);
  if (to_float(t) < x) ++t.bits;
  return t;
}
template <> inline float from_float_up<float>(float x) { return x; }

}  // namespace effx
