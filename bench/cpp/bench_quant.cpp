// effx C++ benchmark: group-wise quantization CPU kernel, torch-free. Prints time, bytes
// moved, GB/s and the fraction of the measured host copy bandwidth per shape. Exits 1 unless
// every dequantized value is within half a quantization step of the input.
#include <cmath>
#include <cstdio>
#include <random>
#include <thread>
#include <vector>

#include "effx/quant.h"
#include "timing.h"

int main() {
  const int threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const double roof = effx_bench::host_copy_gbps();
  std::printf("host copy roof: %.1f GB/s, threads: %d\n", roof, threads);
  std::printf("%-10s %5s %5s %10s %10s %8s %7s\n", "op", "bits", "G", "elements", "ms", "GB/s", "roof%");
  const int64_t cols = 4096, rows = 4096;  // 16M fp32 values
  std::vector<float> x(rows * cols);
  std::mt19937 rng(0);
  std::normal_distribution<float> dist;
  for (auto& v : x) v = dist(rng);
  int64_t failures = 0;
  for (int bits : {2, 4, 8}) {
    const int group = 32;
    effx::QuantShape s{rows, cols, cols, bits, group};
    std::vector<int32_t> codes(rows * effx::quant_words_per_row(cols, bits));
    std::vector<float> scale(rows * cols / group), zero(rows * cols / group), out(rows * cols);
    const double bytes_q = 4.0 * x.size() + 4.0 * codes.size() + 8.0 * scale.size();
    const double tq = effx_bench::median_seconds([&] {
      effx::cpu::quantize(s, effx::DType::Float32, x.data(), codes.data(), scale.data(),
                          zero.data(), threads);
    });
    const double td = effx_bench::median_seconds([&] {
      effx::cpu::dequantize(s, codes.data(), effx::DType::Float32, scale.data(), zero.data(),
                            effx::DType::Float32, out.data(), threads);
    });
    int64_t bad = 0;
    for (int64_t i = 0; i < rows * cols; ++i) {
      const float sc = scale[i / group];
      if (!(std::fabs(out[i] - x[i]) <= 0.5f * sc * 1.0001f + 1e-6f * (std::fabs(x[i]) + 1.0f)) && bad++ < 5)
        std::printf("CHECK FAILED: %d-bit value %lld: %.8g dequantized to %.8g (scale %.6g)\n", bits, (long long)i, x[i],
                    out[i], sc);
    }
    failures += bad;
    for (auto [name, t] : {std::pair{"quantize", tq}, std::pair{"dequantize", td}}) {
      const double gbps = bytes_q / t / 1e9;
      std::printf("%-10s %5d %5d %10zu %10.3f %8.1f %6.1f%%\n", name, bits, group, x.size(),
                  t * 1e3, gbps, 100.0 * gbps / roof);
    }
  }
  if (failures) {
    std::printf("FAILED: %lld values off by more than half a step\n", (long long)failures);
    return 1;
  }
  return 0;
}
