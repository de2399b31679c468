// effx C++ test: the in-register fp16/bf16 -> fp32 widening of the CPU kernels (load_widened in
// csrc/kernels/cpu/block_gemm.inc) in every instruction-set variant this CPU runs, against the
// scalar conversions of include/effx/dtype.h on all 65536 bit patterns of each type: normals,
// subnormals, signed zeros, infinities and NaNs; and again with the FPU's flush-to-zero and
// denormals-are-zero flags set (torch.set_flush_denormal), which must not change any of them.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "block_gemm.h"
#include "check.h"

namespace effx {
namespace cpu {
namespace {
#include "block_gemm_variants.inc"
}  // namespace
}  // namespace cpu
}  // namespace effx

namespace {

bool same(float got, float want) {
  if (std::isnan(want)) return std::isnan(got) && std::signbit(got) == std::signbit(want);
  return std::memcmp(&got, &want, sizeof got) == 0;  // bitwise: -0 is not +0
}

// `widen(src, n, dst)`: one variant's Kernels::widen.
template <typename T, typename Widen>
void check_all(const char* isa, const char* type, Widen widen) {
  std::vector<T> in(65536);
  for (uint32_t b = 0; b < 65536; ++b) in[b].bits = static_cast<uint16_t>(b);
  std::vector<float> out(in.size());
  widen(in.data(), static_cast<int64_t>(in.size()), out.data());
  for (uint32_t b = 0; b < 65536; ++b) {
    const float want = effx::to_float(in[b]);
    EFFX_EXPECT(same(out[b], want), "%s %s bits 0x%04x: got %a, want %a", isa, type, b, out[b], want);
  }
}

template <typename K>
void check_isa(const char* isa) {
  check_all<effx::Half>(isa, "fp16", [](const effx::Half* s, int64_t n, float* d) { K::widen(s, n, d); });
  check_all<effx::BFloat16>(isa, "bf16", [](const effx::BFloat16* s, int64_t n, float* d) { K::widen(s, n, d); });
  std::printf("widen_cpu %s: all fp16 and bf16 bit patterns ok\n", isa);
}

void check_every_isa() {
  namespace cpu = effx::cpu;
  using cpu::block_gemm::Isa;
  const Isa best = cpu::block_gemm::best_isa();
  check_isa<cpu::isa_baseline::Kernels>("baseline");
  if (best == Isa::Avx2 || best == Isa::Avx512) check_isa<cpu::isa_avx2::Kernels>("avx2");
  if (best == Isa::Avx512) check_isa<cpu::isa_avx512::Kernels>("avx512");
}

}  // namespace

int main() {
  check_every_isa();
#if defined(__x86_64__)
  _mm_setcsr(_mm_getcsr() | 0x8040u);  // FTZ (bit 15) and DAZ (bit 6)
  std::printf("widen_cpu with flush-to-zero and denormals-are-zero:\n");
  check_every_isa();
#endif
  return 0;
}
