// effx C++ test: DejaVu sparse MLP CUDA kernels agree with the CPU kernels (fp32 tolerance),
// shared and per-row index sets, gated and not, vector and scalar paths, empty sets; the down
// projection is bitwise identical run to run. Exits 77 (ctest: skipped) when no GPU is present.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "check.h"
#include "cuda_buffers.h"
#include "effx/sparse.h"
#include "effx/sparse_cuda.h"

namespace {

void compare(int64_t batch, int64_t d, int64_t n, int64_t k, bool per_row, bool gated) {
  std::mt19937 rng(static_cast<unsigned>(batch + d + n + k));
  std::normal_distribution<float> dist;
  std::vector<float> x(batch * d), w(n * d), wg(n * d), w2(n * d), bu(n), b2(d);
  for (auto* v : {&x, &w, &wg, &w2, &bu, &b2}) {
    for (auto& e : *v) e = dist(rng) * 0.2f;
  }
  const int64_t sets = per_row ? batch : 1;
  std::vector<int64_t> idx;
  for (int64_t s = 0; s < sets; ++s) {
    std::vector<int64_t> all(n);
    for (int64_t i = 0; i < n; ++i) all[i] = i;
    std::shuffle(all.begin(), all.end(), rng);
    idx.insert(idx.end(), all.begin(), all.begin() + k);
  }
  const int64_t stride = per_row ? k : 0;
  const effx::SparseUpShape up{batch, d, k, 1, d, d, stride};
  const effx::SparseDownShape down{batch, d, k, 1, k, d, stride};
  std::vector<float> h(batch * k), y(batch * d);
  const auto act = effx::Activation::Silu;
  effx::cpu::sparse_mlp_up(up, effx::DType::Float32, act, x.data(), w.data(), gated ? wg.data() : nullptr,
                           bu.data(), nullptr, idx.data(), h.data(), 2);
  effx::cpu::sparse_mlp_down(down, effx::DType::Float32, h.data(), w2.data(), b2.data(), idx.data(), y.data(), 2);

  float *dx = to_device(x), *dw = to_device(w), *dwg = to_device(wg), *dw2 = to_device(w2);
  float *dbu = to_device(bu), *db2 = to_device(b2);
  int64_t* didx = to_device(idx);
  float* dh = to_device(std::vector<float>(batch * k));
  float* dy = to_device(std::vector<float>(batch * d));
  float* ws = to_device(std::vector<float>(effx::cuda::sparse_mlp_down_workspace(down, effx::DType::Float32)));
  CUDA_OK(effx::cuda::sparse_mlp_up(up, effx::DType::Float32, act, dx, dw, gated ? dwg : nullptr, dbu, nullptr,
                                    didx, dh, nullptr));
  CUDA_OK(effx::cuda::sparse_mlp_down(down, effx::DType::Float32, dh, dw2, db2, didx, ws, dy, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  const auto gh = to_host(dh, h.size()), gy = to_host(dy, y.size());
  for (size_t i = 0; i < h.size(); ++i) {
    EFFX_EXPECT(std::fabs(gh[i] - h[i]) <= 1e-4f * (1 + std::fabs(h[i])), "h %zu: %g vs %g", i, gh[i], h[i]);
  }
  for (size_t i = 0; i < y.size(); ++i) {
    EFFX_EXPECT(std::fabs(gy[i] - y[i]) <= 1e-4f * (1 + std::fabs(y[i])), "y %zu: %g vs %g", i, gy[i], y[i]);
  }
  // Same inputs, same bits.
  CUDA_OK(effx::cuda::sparse_mlp_down(down, effx::DType::Float32, dh, dw2, db2, didx, ws, dy, nullptr));
  const auto again = to_host(dy, y.size());
  for (size_t i = 0; i < y.size(); ++i) EFFX_EXPECT(again[i] == gy[i], "rerun differs at %zu", i);
  for (void* p : {static_cast<void*>(dx), static_cast<void*>(dw), static_cast<void*>(dwg),
                  static_cast<void*>(dw2), static_cast<void*>(dbu), static_cast<void*>(db2),
                  static_cast<void*>(didx), static_cast<void*>(dh), static_cast<void*>(dy),
                  static_cast<void*>(ws)}) {
    CUDA_OK(cudaFree(p));
  }
}

}  // namespace

int main() {
  require_device("sparse_cuda");
  for (bool per_row : {false, true}) {
    for (bool gated : {false, true}) {
      compare(1, 4096, 2048, 205, per_row, gated);
      compare(5, 1024, 700, 350, per_row, gated);
      compare(16, 515, 300, 299, per_row, gated);  // odd d: scalar path
      compare(3, 64, 40, 0, per_row, gated);        // empty set: bias only
    }
  }
  std::printf("sparse_cuda: ok\n");
  return 0;
}
