// effx C++ benchmark: DejaVu sparse MLP CPU kernels, torch-free. Llama-7B MLP shape (d 4096,
// n 11008) in bf16: the gated up projection and the down projection at several densities and
// batch sizes. Each call gets a fresh random index set from a rotating pool, as decoding does,
// so gathered rows are not served from the last call's cache. Prints time, gathered bytes,
// GB/s and the fraction of the measured host copy bandwidth.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

#include "effx/sparse.h"
#include "timing.h"

namespace {

constexpr int kPool = 8;

std::vector<int64_t> random_set(int64_t n, int64_t k, std::mt19937& rng) {
  std::vector<int64_t> all(n);
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), rng);
  all.resize(k);
  std::sort(all.begin(), all.end());
  return all;
}

}  // namespace

int main(int argc, char** argv) {
  // --quick: a smaller shape for ctest; --threads N: thread count (default: all cores).
  bool quick = false;
  int threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--quick") quick = true;
    if (arg == "--threads" && i + 1 < argc) threads = std::max(1, std::atoi(argv[++i]));
  }
  const double roof = effx_bench::host_copy_gbps();
  const int64_t d = quick ? 1024 : 4096, n = quick ? 2752 : 11008;
  std::printf("host copy roof: %.1f GB/s, threads: %d, d %lld, n %lld, bf16\n", roof, threads,
              static_cast<long long>(d), static_cast<long long>(n));
  std::printf("%-10s %5s %7s %10s %10s %8s %7s\n", "op", "batch", "density", "MB gathered", "ms", "GB/s",
              "roof%");
  std::mt19937 rng(0);
  std::normal_distribution<float> dist;
  auto random_bf16 = [&](size_t count) {
    std::vector<effx::BFloat16> v(count);
    for (auto& e : v) e = effx::from_float<effx::BFloat16>(dist(rng));
    return v;
  };
  const auto w_up = random_bf16(n * d), w_gate = random_bf16(n * d), w_down_t = random_bf16(n * d);
  for (int64_t batch : {1, 4, 16}) {
    const auto x = random_bf16(batch * d);
    for (double density : {0.1, 0.25, 0.5, 1.0}) {
      const int64_t k = static_cast<int64_t>(density * n);
      std::vector<std::vector<int64_t>> pool;
      for (int i = 0; i < kPool; ++i) pool.push_back(random_set(n, k, rng));
      std::vector<effx::BFloat16> h(batch * k), y(batch * d);
      const effx::SparseUpShape up{batch, d, k, 1, d, d, 0};
      const effx::SparseDownShape down{batch, d, k, 1, k, d, 0};
      int call = 0;
      const double tu = effx_bench::median_seconds([&] {
        effx::cpu::sparse_mlp_up(up, effx::DType::BFloat16, effx::Activation::Silu, x.data(),
                                 w_up.data(), w_gate.data(), nullptr, nullptr,
                                 pool[call++ % kPool].data(), h.data(), threads);
      });
      const double td = effx_bench::median_seconds([&] {
        effx::cpu::sparse_mlp_down(down, effx::DType::BFloat16, h.data(), w_down_t.data(), nullptr,
                                   pool[call++ % kPool].data(), y.data(), threads);
      });
      const double row_bytes = 2.0 * d * k;
      for (auto [name, t, bytes] : {std::tuple{"up+gate", tu, 2 * row_bytes}, std::tuple{"down", td, row_bytes}}) {
        const double gbps = bytes / t / 1e9;
        std::printf("%-10s %5lld %6.0f%% %10.1f %10.3f %8.1f %6.1f%%\n", name, static_cast<long long>(batch),
                    100 * density, bytes / 1e6, t * 1e3, gbps, 100.0 * gbps / roof);
      }
    }
  }
  return 0;
}
