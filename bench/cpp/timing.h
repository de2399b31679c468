// effx C++ benchmarks: median wall time of a callable and the host copy roof (the fp32 FMA roof
// is effx::cpu::fma_peak, include/effx/peak.h).
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

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

}  // namespace effx_bench
