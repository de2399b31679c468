// effx C++ test: group-wise quantization CUDA kernels agree with the CPU kernel (exactly for
// scales and zeros; codes may differ by one where fp32 rounding lands on a tie).
// Exits 77 (ctest: skipped) when no GPU is present.
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "check.h"
#include "cuda_buffers.h"
#include "effx/quant.h"
#include "effx/quant_cuda.h"

namespace {

void compare(int bits, int group_size, int rows, int cols) {
  std::mt19937 rng(99 + bits + group_size);
  std::normal_distribution<float> dist(0.0f, 2.0f);
  std::vector<float> x(static_cast<size_t>(rows) * cols);
  for (auto& v : x) v = dist(rng);
  const effx::QuantShape s{rows, cols, cols, bits, group_size};
  const size_t words = rows * effx::quant_words_per_row(cols, bits);
  const size_t groups = static_cast<size_t>(rows) * (cols / group_size);
  std::vector<int32_t> codes(words);
  std::vector<float> scale(groups), zero(groups), out(x.size());
  effx::cpu::quantize(s, effx::DType::Float32, x.data(), codes.data(), scale.data(), zero.data(), 1);

  float* dx = to_device(x);
  int32_t* dcodes = to_device(std::vector<int32_t>(words));
  float* dscale = to_device(std::vector<float>(groups));
  float* dzero = to_device(std::vector<float>(groups));
  float* dout = to_device(std::vector<float>(x.size()));
  CUDA_OK(effx::cuda::quantize(s, effx::DType::Float32, dx, dcodes, dscale, dzero, nullptr));
  CUDA_OK(effx::cuda::dequantize(s, dcodes, effx::DType::Float32, dscale, dzero,
                                 effx::DType::Float32, dout, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  const auto gscale = to_host(dscale, groups), gzero = to_host(dzero, groups);
  const auto gout = to_host(dout, x.size());
  for (size_t g = 0; g < groups; ++g) {
    EFFX_EXPECT(gscale[g] == scale[g] && gzero[g] == zero[g], "group %zu", g);
  }
  for (size_t i = 0; i < x.size(); ++i) {
    const float sc = scale[(i / cols) * (cols / group_size) + (i % cols) / group_size];
    EFFX_EXPECT(std::abs(gout[i] - x[i]) <= 0.5f * sc * (1 + 1e-4f) + 1e-6f, "element %zu", i);
  }
  for (void* p : {static_cast<void*>(dx), static_cast<void*>(dcodes), static_cast<void*>(dscale),
                  static_cast<void*>(dzero), static_cast<void*>(dout)}) {
    CUDA_OK(cudaFree(p));
  }
}

}  // namespace

int main() {
  require_device("quant_cuda");
  for (int bits : {2, 4, 8}) {
    for (int g : {8, 32, 48, 128}) compare(bits, g, 33, g * 7);
  }
  std::printf("quant_cuda: ok\n");
  return 0;
}
