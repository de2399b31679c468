// effx C++ test: the base-2 exponential of the CPU attention engine's softmax (exp2_nonpositive
// in attention_engine.inc, avx512_math.h) in every instruction-set variant this CPU runs,
// through exp2_shifted_sum, against exp2 in double: every 256th fp32 in [-1, 0], a million
// random points of [-126, 0], the subnormal range and the special values. Normal results are
// within 1 ulp (2 where the variant has no FMA); below 2^-126 a variant may flush to zero.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "attention_engine.h"
#include "check.h"

namespace {

float from_bits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

std::vector<float> inputs() {
  std::vector<float> x;
  for (uint32_t b = 0x80000000u; b <= 0xbf800000u; b += 256) x.push_back(from_bits(b));  // [-1, -0]
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> wide(-126.0f, 0.0f), deep(-160.0f, -126.0f);
  for (int i = 0; i < 1000000; ++i) x.push_back(wide(rng));
  for (int i = 0; i < 10000; ++i) x.push_back(deep(rng));
  for (float v : {0.0f, -0.0f, -0.5f, -1.0f, -125.5f, -126.0f, -149.0f, -150.0f, -1e30f,
                  -std::numeric_limits<float>::infinity()})
    x.push_back(v);
  return x;
}

// `shifted(s, n)`: a variant's exp2_shifted_sum(s, n, 0) (s[j] = 2^s[j] in place).
template <typename Shifted>
void check_isa(const char* isa, double max_ulp, Shifted shifted) {
  const std::vector<float> x = inputs();
  std::vector<float> y = x;
  shifted(y.data(), static_cast<int64_t>(y.size()));
  double worst = 0.0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double want = std::exp2(static_cast<double>(x[i]));
    const float got = y[i];
    if (want < 0x1p-126) {  // subnormal or zero: flushing is allowed
      EFFX_EXPECT(got >= 0.0f && got <= 0x1p-126f, "%s: exp2(%a) = %a, want %a or 0", isa, x[i], got, want);
      continue;
    }
    const double ulp = std::ldexp(1.0, std::ilogb(want) - 23);
    const double err = std::fabs(got - want) / ulp;
    EFFX_EXPECT(err <= max_ulp, "%s: exp2(%a) = %a, want %a (%.2f ulp)", isa, x[i], got, want, err);
    worst = std::max(worst, err);
  }
  EFFX_EXPECT(y[x.size() - 1] == 0.0f, "%s: exp2(-inf) = %a, want 0", isa, y[x.size() - 1]);
  std::printf("exp2_cpu %s: %zu inputs, worst %.2f ulp\n", isa, x.size(), worst);
}

}  // namespace

int main() {
  namespace cpu = effx::cpu;
  using cpu::block_gemm::Isa;
  const Isa best = cpu::block_gemm::best_isa();
  check_isa("baseline", 2.0, [](float* s, int64_t n) { cpu::isa_baseline::exp2_shifted_sum(s, n, 0.0f); });
  if (best == Isa::Avx2 || best == Isa::Avx512) {
    check_isa("avx2", 1.0, [](float* s, int64_t n) { cpu::isa_avx2::exp2_shifted_sum(s, n, 0.0f); });
  }
  if (best == Isa::Avx512) {
    check_isa("avx512", 1.0, [](float* s, int64_t n) { cpu::isa_avx512::exp2_shifted_sum(s, n, 0.0f); });
  }
  return 0;
}
