// effx C++ benchmarks: median wall time of a callable and the host copy roof.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstring>
#include <vector>

namespace effx_bench {

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

// Host memory roof: bytes read + written per second by memcpy of a buffer far beyond cache.
inline double host_copy_gbps(size_t bytes = size_t{256} << 20) {
  std::vector<char> a(bytes, 1), b(bytes, 0);
  const double s = median_seconds([&] { std::memcpy(b.data(), a.data(), bytes); }, 1, 5);
  return 2.0 * bytes / s / 1e9;
}

}  // namespace effx_bench
