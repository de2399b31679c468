// effx: fp16 -> fp32 on vectors of bit patterns (GCC vector types), exact and independent of the
// FPU's denormal flags: a subnormal fp16 is an integer times 2^-24 and is converted as that,
// not through an fp32 subnormal that DAZ (torch.set_flush_denormal) would read as zero. The
// portable fp16 path of block_gemm.inc's load_widened and the fp16 loads of sparse.cpp (whose
// target_clones cannot name F16C; GCC 12 converts _Float16 vectors one element at a time).
#pragma once

#include <cstdint>
#include <cstring>

namespace effx {
namespace cpu {

// Always inlined into the ISA-specific callers, so the ABI of wide vector arguments never matters.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

// u: fp16 bit patterns zero-extended to 32 bits per lane; returns the fp32 bit patterns.
template <typename VecU, typename VecI, typename VecF>
[[gnu::always_inline]] inline VecU fp16_to_fp32_bits(VecU u) {
  const VecU em = u & 0x7fffu;
  const VecU normal = (em << 13) + ((127u - 15u) << 23);
  const VecU special = 0x7f800000u | ((em & 0x3ffu) << 13);
  const VecF sub = __builtin_convertvector(reinterpret_cast<VecI>(em), VecF) * 5.9604644775390625e-8f;  // 2^-24
  VecU sub_bits;
  std::memcpy(&sub_bits, &sub, sizeof sub_bits);
  return (em >= 0x7c00u ? special : (em >= 0x0400u ? normal : sub_bits)) | ((u & 0x8000u) << 16);
}

#pragma GCC diagnostic pop

}  // namespace cpu
}  // namespace effx
