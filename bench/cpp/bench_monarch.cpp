// effx C++ benchmark: Monarch CPU kernels, torch-free. Prints time and GFLOP/s of the forward
// and the backward for square Monarch matrices (n = 1024, 4096; 4 and 16 blocks; 1024 rows),
// fp32, on every hardware thread.
#include <cstdio>
#include <random>
#include <thread>
#include <vector>

#include "effx/monarch.h"
#include "timing.h"

int main() {
  const int threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  std::printf("threads: %d\n%-6s %6s %6s %10s %9s %10s %9s\n", threads, "n", "blocks", "rows",
              "fwd ms", "GFLOP/s", "bwd ms", "GFLOP/s");
  std::mt19937 rng(0);
  std::normal_distribution<float> dist;
  for (int64_t n : {1024, 4096}) {
    for (int64_t blocks : {4, 16}) {
      const int64_t b = n / blocks, rows = 1024;
      const effx::MonarchShape m{rows, blocks, b, b, blocks, b, b, n};
      std::vector<float> x(rows * n), w1(n * b), w2(n * b), out(rows * n), dx(rows * n),
          dw1(n * b), dw2(n * b);
      for (auto* v : {&x, &w1, &w2})
        for (auto& e : *v) e = dist(rng);
      const double tf = effx_bench::median_seconds([&] {
        effx::cpu::monarch_forward(m, effx::DType::Float32, x.data(), w1.data(), w2.data(),
                                   out.data(), threads);
      }, 2, 7);
      const double tb = effx_bench::median_seconds([&] {
        effx::cpu::monarch_backward(m, effx::DType::Float32, out.data(), x.data(), w1.data(),
                                    w2.data(), dx.data(), dw1.data(), dw2.data(), threads);
      }, 2, 7);
      const double flops = 4.0 * rows * n * b;
      std::printf("%-6lld %6lld %6lld %10.3f %9.1f %10.3f %9.1f\n", static_cast<long long>(n),
                  static_cast<long long>(blocks), static_cast<long long>(rows), tf * 1e3,
                  flops / tf / 1e9, tb * 1e3, 2 * flops / tb / 1e9);
    }
  }
  return 0;
}
