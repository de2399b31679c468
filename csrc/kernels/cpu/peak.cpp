// effx: the FMA rate probe of include/effx/peak.h.
#include "effx/peak.h"

#include <algorithm>
#include <chrono>
#include <cstdint>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "bf16_gemm.h"
#include "block_gemm.h"

namespace effx {
namespace cpu {
namespace {

// More independent accumulators than FMA latency times FMA units on any current core (4 x 2),
// so the units, not a dependency chain, bound the rate; with the two constants they fit AVX2's
// 16 registers (16 chains spilled there and read 146 GFLOP/s of 233 on this machine). The
// chains return a value that depends on every one, so that none is optimized away.
constexpr int kChains = 12;

// acc = acc * x + y on kChains vectors V: one FMA each where the caller's target has
// FMA (GCC contracts it), a multiply and an add otherwise, 2 FLOPs per lane either way.
typedef float V16 __attribute__((vector_size(16)));
typedef float V32 __attribute__((vector_size(32)));
typedef float V64 __attribute__((vector_size(64)));

template <typename V>
[[gnu::always_inline]] inline float fp32_chains(int64_t iters) {
  V acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = V{} + static_cast<float>(i);
  const V x = V{} + 0.999999f, y = V{} + 1e-7f;
  for (int64_t it = 0; it < iters; ++it) {
    for (int i = 0; i < kChains; ++i) acc[i] = acc[i] * x + y;
  }
  float s = 0.0f;
  for (int i = 0; i < kChains; ++i) s += acc[i][0];
  return s;
}

float chains_baseline(int64_t iters) { return fp32_chains<V16>(iters); }

#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("avx2,fma"))) float chains_avx2(int64_t iters) { return fp32_chains<V32>(iters); }
__attribute__((target("avx512f"))) float chains_avx512(int64_t iters) { return fp32_chains<V64>(iters); }

// vdpbf16ps: per lane two bf16 products added into fp32, 4 FLOPs. Its latency is longer than
// an FMA's (12 chains read 790-840 GFLOP/s here, 16 read 910), and AVX-512 has 32 registers.
constexpr int kDotChains = 16;

__attribute__((target("avx512f,avx512bf16"))) float chains_bf16(int64_t iters) {
  __m512 acc[kDotChains];
  for (int i = 0; i < kDotChains; ++i) acc[i] = _mm512_set1_ps(static_cast<float>(i));
  __m512bh x = reinterpret_cast<__m512bh>(_mm512_set1_epi32(0x3f803f80));  // (1, 1)
  const __m512bh y = reinterpret_cast<__m512bh>(_mm512_set1_epi32(0x33d633d6));  // (1e-7, 1e-7)
  for (int64_t it = 0; it < iters; ++it) {
    for (int i = 0; i < kDotChains; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], x, y);
    asm volatile("" : "+v"(x));
  }
  float s = 0.0f;
  for (int i = 0; i < kDotChains; ++i) s += _mm512_cvtss_f32(acc[i]);
  return s;
}
#endif

constexpr int64_t kIters = int64_t{1} << 22;  // ~20 ms per run at 3 GHz and 2 FMAs per cycle

// The fastest of 5 runs of `chains(kIters)` on every thread, in FLOP/s given the FLOPs of one
// iteration of one thread.
template <typename Chains>
double best_rate(int num_threads, double flops_per_iter, Chains chains) {
  double best = 0.0;
  volatile float sink = 0.0f;
  for (int run = 0; run < 5; ++run) {
    const auto t0 = std::chrono::steady_clock::now();
    float s = 0.0f;
    int ran = 0;  // threads the runtime gave, which may be fewer than asked
#pragma omp parallel num_threads(std::max(1, num_threads)) reduction(+ : s, ran)
    {
      ran += 1;
      s += chains(kIters);
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    sink = sink + s;
    best = std::max(best, flops_per_iter * kIters * ran / seconds);
  }
  return best;
}

}  // namespace

FmaPeak fma_peak(int num_threads) {
  using block_gemm::Isa;
  const Isa isa = block_gemm::best_isa();
  const int lanes = isa == Isa::Avx512 ? 16 : (isa == Isa::Avx2 ? 8 : 4);
  const double flops = best_rate(num_threads, 2.0 * lanes * kChains, [isa](int64_t iters) {
#if defined(__x86_64__) || defined(__i386__)
    if (isa == Isa::Avx512) return chains_avx512(iters);
    if (isa == Isa::Avx2) return chains_avx2(iters);
#endif
    (void)isa;
    return chains_baseline(iters);
  });
  return {flops, isa == Isa::Avx512 ? "avx512" : (isa == Isa::Avx2 ? "avx2" : "baseline")};
}

double bf16_dot_peak_flops(int num_threads) {
#if defined(__x86_64__)
  if (bf16::available()) return best_rate(num_threads, 4.0 * 16 * kDotChains, chains_bf16);
#endif
  (void)num_threads;
  return 0.0;
}

double amx_peak_flops(int num_threads) {
  if (!bf16::amx_available()) return 0.0;
  // A tile product takes 16 cycles on Sapphire Rapids, so a run has 64 times fewer iterations
  // (~5 ms); best_rate counts kIters per run.
  constexpr int64_t kTileIters = kIters / 64;
  constexpr double kFlops = 4 * 2.0 * 16 * 16 * 32;  // per iteration: four products of 16 x 16 x 32
  return best_rate(num_threads, kFlops * kTileIters / kIters, [](int64_t) { return bf16::amx_chains(kTileIters); });
}

}  // namespace cpu
}  // namespace effx
