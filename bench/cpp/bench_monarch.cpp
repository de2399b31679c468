// effx C++ benchmark: Monarch CPU kernels, torch-free. Prints time and GFLOP/s of the forward
// and the backward for square Monarch matrices (n = 1024, 4096; 4 and 16 blocks; 1024 rows),
// fp32, on every hardware thread. Exits 1 unless sampled forward outputs match an fp64
// evaluation of the block formula in include/effx/monarch.h.
#include <cmath>
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
  int failures = 0;
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
      for (int sample = 0; sample < 32; ++sample) {
        // out[t, d*l + j] = sum_c w2[j, d, c] * out1[t, c*l + j], out1[m] = sum_e w1[m/q, m%q, e] x[(m/q)*p + e]
        const int64_t t = rng() % rows, o = rng() % n, dd = o / m.l, j = o % m.l;
        double want = 0, mag = 0;
        for (int64_t c = 0; c < m.r; ++c) {
          const int64_t mid = c * m.l + j, i = mid / m.q, a = mid % m.q;
          double o1 = 0;
          for (int64_t e = 0; e < m.p; ++e) o1 += double(w1[(i * m.q + a) * m.p + e]) * x[t * n + i * m.p + e];
          want += double(w2[(j * m.s + dd) * m.r + c]) * o1;
          mag += std::fabs(double(w2[(j * m.s + dd) * m.r + c]) * o1);
        }
        const double got = out[t * n + o];
        if (!(std::fabs(got - want) <= 1e-5 * mag + 1e-6) && failures++ < 5)
          std::printf("CHECK FAILED: n %lld, %lld blocks: out[%lld, %lld] = %.8g, expected %.8g\n", (long long)n,
                      (long long)blocks, (long long)t, (long long)o, got, want);
      }
      const double flops = 4.0 * rows * n * b;
      std::printf("%-6lld %6lld %6lld %10.3f %9.1f %10.3f %9.1f\n", static_cast<long long>(n),
                  static_cast<long long>(blocks), static_cast<long long>(rows), tf * 1e3,
                  flops / tf / 1e9, tb * 1e3, 2 * flops / tb / 1e9);
    }
  }
  if (failures) {
    std::printf("FAILED: %d sampled outputs differ from the fp64 block formula\n", failures);
    return 1;
  }
  return 0;
}
