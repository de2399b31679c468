// effx C++ benchmarks: median wall time of a callable, the host copy roof and the fp32 FMA roof.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

namespace effx_bench {

// Command line of the benchmarks: --quick (a smaller shape, for ctest) and --threads N
// (default: every core).
struct Options {
  bool quick = false;
  int threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
};

inline Options parse_options(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--quick") o.quick = true;
    if (arg == "--threads" && i + 1 < argc) o.threads = std::max(1, std::atoi(argv[++i]));
  }
  return o;
}

template <typename F>
double median_seconds(F&& f, int warmup = 3, int runs = 15) {
  for (int i = 0; i < warmup; ++i) f();
  std::vector<double> t(runs);
  for (int i = 0; i < runs; ++i) {
    const auto a = std::chrono::steady_clock::now();
    f();
    t[i] = std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count();
  }
  std::nth_element(t.begin(), t.begin() + runs / 2, t.end());
  return t[runs / 2];
}

// Like median_seconds, but `setup` runs untimed before every call of `f` (for kernels that
// consume their input, e.g. eviction or an append into a cache that must start empty).
template <typename S, typename F>
double median_seconds_after(S&& setup, F&& f, int warmup = 3, int runs = 15) {
  for (int i = 0; i < warmup; ++i) {
    setup();
    f();
  }
  std::vector<double> t(runs);
  for (int i = 0; i < runs; ++i) {
    setup();
    const auto a = std::chrono::steady_clock::now();
    f();
    t[i] = std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count();
  }
  std::nth_element(t.begin(), t.begin() + runs / 2, t.end());
  return t[runs / 2];
}

// Host memory roof: bytes read + written per second by memcpy of a buffer far beyond cache.
inline double host_copy_gbps(size_t bytes = size_t{256} << 20) {
  std::vector<char> a(bytes, 1), b(bytes, 0);
  const double s = median_seconds([&] { std::memcpy(b.data(), a.data(), bytes); }, 1, 5);
  return 2.0 * bytes / s / 1e9;
}

namespace detail {

// 12 independent chains cover FMA latency x throughput (4 x 2) with room to spare; the
// recurrence acc = acc * 0.999 + 0.001 stays bounded and normal. Returns a value to keep.
#if defined(__GNUC__) && defined(__x86_64__)
__attribute__((target("avx512f"))) inline float fma_chains_avx512(int64_t iters) {
  const __m512 a = _mm512_set1_ps(0.999f), b = _mm512_set1_ps(0.001f);
  __m512 c0 = _mm512_set1_ps(0), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0,
         c8 = c0, c9 = c0, c10 = c0, c11 = c0;
  for (int64_t i = 0; i < iters; ++i) {
    c0 = _mm512_fmadd_ps(c0, a, b); c1 = _mm512_fmadd_ps(c1, a, b); c2 = _mm512_fmadd_ps(c2, a, b);
    c3 = _mm512_fmadd_ps(c3, a, b); c4 = _mm512_fmadd_ps(c4, a, b); c5 = _mm512_fmadd_ps(c5, a, b);
    c6 = _mm512_fmadd_ps(c6, a, b); c7 = _mm512_fmadd_ps(c7, a, b); c8 = _mm512_fmadd_ps(c8, a, b);
    c9 = _mm512_fmadd_ps(c9, a, b); c10 = _mm512_fmadd_ps(c10, a, b); c11 = _mm512_fmadd_ps(c11, a, b);
  }
  const __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(c0, c1), _mm512_add_ps(c2, c3)),
                                 _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(c4, c5), _mm512_add_ps(c6, c7)),
                                               _mm512_add_ps(_mm512_add_ps(c8, c9), _mm512_add_ps(c10, c11))));
  return _mm512_reduce_add_ps(s);
}

__attribute__((target("avx2,fma"))) inline float fma_chains_avx2(int64_t iters) {
  const __m256 a = _mm256_set1_ps(0.999f), b = _mm256_set1_ps(0.001f);
  __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0,
         c8 = c0, c9 = c0, c10 = c0, c11 = c0;
  for (int64_t i = 0; i < iters; ++i) {
    c0 = _mm256_fmadd_ps(c0, a, b); c1 = _mm256_fmadd_ps(c1, a, b); c2 = _mm256_fmadd_ps(c2, a, b);
    c3 = _mm256_fmadd_ps(c3, a, b); c4 = _mm256_fmadd_ps(c4, a, b); c5 = _mm256_fmadd_ps(c5, a, b);
    c6 = _mm256_fmadd_ps(c6, a, b); c7 = _mm256_fmadd_ps(c7, a, b); c8 = _mm256_fmadd_ps(c8, a, b);
    c9 = _mm256_fmadd_ps(c9, a, b); c10 = _mm256_fmadd_ps(c10, a, b); c11 = _mm256_fmadd_ps(c11, a, b);
  }
  __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(c0, c1), _mm256_add_ps(c2, c3)),
                           _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(c4, c5), _mm256_add_ps(c6, c7)),
                                         _mm256_add_ps(_mm256_add_ps(c8, c9), _mm256_add_ps(c10, c11))));
  alignas(32) float v[8];
  _mm256_store_ps(v, s);
  return v[0] + v[1] + v[2] + v[3] + v[4] + v[5] + v[6] + v[7];
}

// x86-64 baseline (SSE2, no FMA): a multiply and an add, still 2 flops per lane.
inline float fma_chains_sse(int64_t iters) {
  const __m128 a = _mm_set1_ps(0.999f), b = _mm_set1_ps(0.001f);
  __m128 c[12];
  for (auto& e : c) e = _mm_setzero_ps();
  for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 12
    for (int j = 0; j < 12; ++j) c[j] = _mm_add_ps(_mm_mul_ps(c[j], a), b);
  }
  __m128 s = _mm_setzero_ps();
  for (const auto& e : c) s = _mm_add_ps(s, e);
  alignas(16) float v[4];
  _mm_store_ps(v, s);
  return v[0] + v[1] + v[2] + v[3];
}
#endif

}  // namespace detail

struct FmaRoof {
  double gflops;    // fp32 GFLOP/s over all threads (an FMA counts 2)
  const char* isa;  // the vector width it ran at
};

// fp32 compute roof: register-only FMA chains on `threads` threads at the widest instruction
// set the CPU kernels would use (the same EFFX_CPU_ISA cap as csrc/kernels/cpu/block_gemm.h).
inline FmaRoof fma_roof_gflops(int threads) {
  threads = std::max(1, threads);
#if defined(__GNUC__) && defined(__x86_64__)
  const char* cap = std::getenv("EFFX_CPU_ISA");
  const bool allow512 = cap == nullptr || std::strcmp(cap, "avx512") == 0;
  const bool allow2 = allow512 || std::strcmp(cap, "avx2") == 0;
  const bool fma = __builtin_cpu_supports("fma");
  const bool use512 = allow512 && fma && __builtin_cpu_supports("avx512f");
  const bool use2 = !use512 && allow2 && fma && __builtin_cpu_supports("avx2");
  const int64_t iters = 4'000'000;
  const double lanes = use512 ? 16 : use2 ? 8 : 4, chains = 12;
  std::vector<float> sink(threads);
  // The fastest of several runs: a roof is what the machine can reach, and on a shared
  // machine a run only ever loses time to other tenants.
  double s = 1e30;
  for (int run = 0; run < 8; ++run) {
    const auto a = std::chrono::steady_clock::now();
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([&, t] {
        sink[t] = use512 ? detail::fma_chains_avx512(iters)
                  : use2 ? detail::fma_chains_avx2(iters)
                         : detail::fma_chains_sse(iters);
      });
    for (auto& th : pool) th.join();
    if (run > 0) s = std::min(s, std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count());
  }
  volatile float keep = sink[0];
  (void)keep;
  return {2.0 * lanes * chains * iters * threads / s / 1e9, use512 ? "avx512" : use2 ? "avx2" : "sse2"};
#else
  return {0.0, "unknown"};
#endif
}

}  // namespace effx_bench
