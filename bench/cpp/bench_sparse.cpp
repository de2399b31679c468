// effx C++ benchmark: DejaVu sparse MLP CPU kernels, torch-free. Llama-7B MLP shape (d 4096,
// n 11008) in bf16: the gated up projection and the down projection at several densities and
// batch sizes. Each call gets a fresh random index set from a rotating pool, as decoding does,
// so gathered rows are not served from the last call's cache. Prints time, gathered bytes,
// GB/s and the fraction of the measured host copy bandwidth. Then the attention-head ops
// (sparse_head_qkv / sparse_head_out: the same kernels selecting head_dim = 128 rows per index):
// the query projection of the selected heads and the output projection, d 4096, 32 heads.
// Sampled outputs of every shape are checked against fp64 sums (exit 1 on a mismatch).
#include <algorithm>
#include <cmath>
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

using Bf16s = std::vector<effx::BFloat16>;
int failures = 0;

// Recomputes sampled entries of h = act(x Wg^T) * (x W^T) (silu, gated) or x W^T (heads) over
// the selected rows, and of y = h W2t[selected rows], in fp64 from the bf16 operands; bf16
// outputs round to 2^-8 relative.
void check(const char* what, int64_t batch, int64_t d, int64_t k, int64_t rows_per_index, bool gated,
           const Bf16s& x, const Bf16s& w, const Bf16s& w_gate, const Bf16s& h, const Bf16s& w_down_t,
           const std::vector<int64_t>& idx, const Bf16s& y, std::mt19937& rng) {
  auto f = [](effx::BFloat16 v) { return double(effx::to_float(v)); };
  const int64_t width = k * rows_per_index;
  for (int s = 0; s < 16 && width > 0; ++s) {
    const int64_t b = rng() % batch, j = rng() % width;
    const int64_t row = idx[j / rows_per_index] * rows_per_index + j % rows_per_index;
    double u = 0, g = 0, mag_u = 0, mag_g = 0;  // mag: sums of |terms|, bounding fp32 rounding
    for (int64_t c = 0; c < d; ++c) {
      u += f(x[b * d + c]) * f(w[row * d + c]);
      mag_u += std::fabs(f(x[b * d + c]) * f(w[row * d + c]));
      if (gated) g += f(x[b * d + c]) * f(w_gate[row * d + c]);
      if (gated) mag_g += std::fabs(f(x[b * d + c]) * f(w_gate[row * d + c]));
    }
    const double act = gated ? g / (1 + std::exp(-g)) : 1.0;
    const double want = act * u, got = f(h[b * width + j]);
    const double tol = 8e-3 * std::fabs(want) + 1e-5 * (mag_u * std::fabs(act) + mag_g * std::fabs(u)) + 1e-6;
    if (!(std::fabs(got - want) <= tol)) {
      if (++failures <= 10) std::printf("CHECK FAILED: %s h[%lld, %lld] = %.6g, expected %.6g\n", what, (long long)b, (long long)j, got, want);
    }
  }
  for (int s = 0; s < 16; ++s) {
    const int64_t b = rng() % batch, o = rng() % d;
    double want = 0, mag = 0;
    for (int64_t j = 0; j < width; ++j) {
      const int64_t row = idx[j / rows_per_index] * rows_per_index + j % rows_per_index;
      const double t = f(h[b * width + j]) * f(w_down_t[row * d + o]);
      want += t;
      mag += std::fabs(t);
    }
    const double got = f(y[b * d + o]);
    if (!(std::fabs(got - want) <= 8e-3 * std::fabs(want) + 1e-5 * mag + 1e-6)) {
      if (++failures <= 10) std::printf("CHECK FAILED: %s y[%lld, %lld] = %.6g, expected %.6g\n", what, (long long)b, (long long)o, got, want);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  const auto [quick, threads] = effx_bench::parse_options(argc, argv);
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
      effx::cpu::sparse_mlp_up(up, effx::DType::BFloat16, effx::Activation::Silu, x.data(), w_up.data(),
                               w_gate.data(), nullptr, nullptr, pool[0].data(), h.data(), threads);
      effx::cpu::sparse_mlp_down(down, effx::DType::BFloat16, h.data(), w_down_t.data(), nullptr, pool[0].data(),
                                 y.data(), threads);
      check("mlp", batch, d, k, 1, true, x, w_up, w_gate, h, w_down_t, pool[0], y, rng);
      const double row_bytes = 2.0 * d * k;
      for (auto [name, t, bytes] : {std::tuple{"up+gate", tu, 2 * row_bytes}, std::tuple{"down", td, row_bytes}}) {
        const double gbps = bytes / t / 1e9;
        std::printf("%-10s %5lld %6.0f%% %10.1f %10.3f %8.1f %6.1f%%\n", name, static_cast<long long>(batch),
                    100 * density, bytes / 1e6, t * 1e3, gbps, 100.0 * gbps / roof);
      }
    }
  }

  // Attention heads: w_q [Hq * 128, d] (ungated, no activation), w_o_t [Hq * 128, d].
  const int64_t hd = 128, hq = d / hd;
  const auto w_q = random_bf16(hq * hd * d), w_o_t = random_bf16(hq * hd * d);
  std::printf("%-10s %5s %7s %10s %10s %8s %7s  (%lld heads of %lld)\n", "head op", "batch", "density", "MB gathered",
              "ms", "GB/s", "roof%", static_cast<long long>(hq), static_cast<long long>(hd));
  for (int64_t batch : {1, 16}) {
    const auto x = random_bf16(batch * d);
    for (double density : {0.25, 0.5}) {
      const int64_t k = static_cast<int64_t>(density * hq);
      std::vector<std::vector<int64_t>> pool;
      for (int i = 0; i < kPool; ++i) pool.push_back(random_set(hq, k, rng));
      std::vector<effx::BFloat16> h(batch * k * hd), y(batch * d);
      const effx::SparseUpShape up{batch, d, k, hd, d, d, 0};
      const effx::SparseDownShape down{batch, d, k, hd, k * hd, d, 0};
      int call = 0;
      const double tq = effx_bench::median_seconds([&] {
        effx::cpu::sparse_mlp_up(up, effx::DType::BFloat16, effx::Activation::None, x.data(), w_q.data(), nullptr,
                                 nullptr, nullptr, pool[call++ % kPool].data(), h.data(), threads);
      });
      const double to = effx_bench::median_seconds([&] {
        effx::cpu::sparse_mlp_down(down, effx::DType::BFloat16, h.data(), w_o_t.data(), nullptr,
                                   pool[call++ % kPool].data(), y.data(), threads);
      });
      effx::cpu::sparse_mlp_up(up, effx::DType::BFloat16, effx::Activation::None, x.data(), w_q.data(), nullptr,
                               nullptr, nullptr, pool[0].data(), h.data(), threads);
      effx::cpu::sparse_mlp_down(down, effx::DType::BFloat16, h.data(), w_o_t.data(), nullptr, pool[0].data(),
                                 y.data(), threads);
      check("heads", batch, d, k, hd, false, x, w_q, w_q, h, w_o_t, pool[0], y, rng);
      const double bytes = 2.0 * d * k * hd;
      for (auto [name, t] : {std::pair{"head q", tq}, std::pair{"head out", to}}) {
        const double gbps = bytes / t / 1e9;
        std::printf("%-10s %5lld %6.0f%% %10.1f %10.3f %8.1f %6.1f%%\n", name, static_cast<long long>(batch),
                    100 * density, bytes / 1e6, t * 1e3, gbps, 100.0 * gbps / roof);
      }
    }
  }
  if (failures) {
    std::printf("FAILED: %d sampled outputs differ from the fp64 sums\n", failures);
    return 1;
  }
  return 0;
}
