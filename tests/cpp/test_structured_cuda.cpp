// effx C++ test: the CUDA Monarch and Pixelfly kernels (forward and backward) agree with the
// CPU ones: fp32 on the FMA path, fp16 and bf16 on tensor cores (their intermediate rounded to
// the dtype, so a looser bound), shapes that are no multiple of the tiles, a strided x, and a
// block-sparse pattern with an empty block-row. Runs on a GPU, or on the SIMT emulator
// (test_structured_simt); exits 77 (ctest: skipped) when neither is there.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <random>
#include <vector>

#include "check.h"
#include "cuda_buffers.h"
#include "effx/monarch.h"
#include "effx/monarch_cuda.h"
#include "effx/pixelfly.h"
#include "effx/pixelfly_cuda.h"

namespace {

using effx::DType;

template <typename T>
std::vector<T> random_values(size_t n, std::mt19937& rng) {
  std::normal_distribution<float> dist(0.0f, 0.5f);
  std::vector<T> v(n);
  for (auto& e : v) e = effx::from_float<T>(dist(rng));
  return v;
}

template <typename T>
void expect_close(const std::vector<T>& got, const std::vector<T>& want, double tol, const char* what) {
  double err = 0, norm = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = effx::to_float(got[i]), w = effx::to_float(want[i]);
    err += (g - w) * (g - w);
    norm += w * w;
  }
  const double rel = std::sqrt(err / (norm > 0 ? norm : 1));
  EFFX_EXPECT(rel < tol, "%s: relative error %g", what, rel);
}

double tolerance(DType t) { return t == DType::Float32 ? 1e-5 : t == DType::Float16 ? 3e-3 : 2e-2; }

template <typename T>
void monarch(DType dtype, const effx::MonarchShape& m) {
  std::mt19937 rng(static_cast<unsigned>(m.rows + m.k * 7 + m.l));
  const auto x = random_values<T>(m.rows * m.x_row_stride, rng), w1 = random_values<T>(m.k * m.q * m.p, rng);
  const auto w2 = random_values<T>(m.l * m.s * m.r, rng), dout = random_values<T>(m.rows * m.n_out(), rng);
  std::vector<T> out(m.rows * m.n_out()), gx(m.rows * m.n_in()), gw1(w1.size()), gw2(w2.size());
  effx::cpu::monarch_forward(m, dtype, x.data(), w1.data(), w2.data(), out.data(), 2);
  effx::cpu::monarch_backward(m, dtype, dout.data(), x.data(), w1.data(), w2.data(), gx.data(), gw1.data(),
                              gw2.data(), 2);
  T *dx = to_device(x), *dw1 = to_device(w1), *dw2 = to_device(w2), *ddout = to_device(dout);
  T *dout_ = to_device(out), *dgx = to_device(gx), *dgw1 = to_device(gw1), *dgw2 = to_device(gw2);
  auto* ws = to_device(std::vector<uint8_t>(effx::cuda::monarch_workspace_bytes(m, dtype, true)));
  CUDA_OK(effx::cuda::monarch_forward(m, dtype, dx, dw1, dw2, dout_, ws, nullptr));
  CUDA_OK(effx::cuda::monarch_backward(m, dtype, ddout, dx, dw1, dw2, dgx, dgw1, dgw2, ws, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  const double tol = tolerance(dtype);
  expect_close(to_host(dout_, out.size()), out, tol, "monarch forward");
  expect_close(to_host(dgx, gx.size()), gx, tol, "monarch grad_x");
  expect_close(to_host(dgw1, gw1.size()), gw1, tol, "monarch grad_w1");
  expect_close(to_host(dgw2, gw2.size()), gw2, tol, "monarch grad_w2");
  for (void* p : {(void*)dx, (void*)dw1, (void*)dw2, (void*)ddout, (void*)dout_, (void*)dgx, (void*)dgw1, (void*)dgw2,
                  (void*)ws}) {
    CUDA_OK(cudaFree(p));
  }
}

template <typename T>
void pixelfly(DType dtype, int64_t rows, int64_t block, int64_t R, int64_t C, int64_t x_stride_extra) {
  std::mt19937 rng(static_cast<unsigned>(rows + block + R * 3 + C));
  std::vector<int64_t> offsets{0}, cols;
  for (int64_t rb = 0; rb < R; ++rb) {
    if (rb != 1) {  // block-row 1 stays empty
      for (int64_t cb = 0; cb < C; ++cb) {
        if ((rb + cb) % 3 != 2 || cb == rb % C) cols.push_back(cb);
      }
    }
    offsets.push_back(static_cast<int64_t>(cols.size()));
  }
  const effx::BlockSparseShape s{rows, block, R, C, static_cast<int64_t>(cols.size()), C * block + x_stride_extra};
  const auto x = random_values<T>(rows * s.x_row_stride, rng), blocks = random_values<T>(s.nnz * block * block, rng);
  const auto dout = random_values<T>(rows * s.out_features(), rng);
  std::vector<T> out(rows * s.out_features()), gx(rows * s.in_features()), gb(blocks.size());
  effx::cpu::block_sparse_forward(s, dtype, x.data(), blocks.data(), offsets.data(), cols.data(), out.data(), 2);
  effx::cpu::block_sparse_backward(s, dtype, dout.data(), x.data(), blocks.data(), offsets.data(), cols.data(),
                                   gx.data(), gb.data(), 2);
  T *dx = to_device(x), *dblocks = to_device(blocks), *ddout = to_device(dout), *dout_ = to_device(out);
  T *dgx = to_device(gx), *dgb = to_device(gb);
  int64_t *doff = to_device(offsets), *dcols = to_device(cols);
  CUDA_OK(effx::cuda::block_sparse_forward(s, dtype, dx, dblocks, doff, dcols, dout_, nullptr));
  CUDA_OK(effx::cuda::block_sparse_backward(s, dtype, ddout, dx, dblocks, doff, dcols, dgx, dgb, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  const double tol = tolerance(dtype);
  expect_close(to_host(dout_, out.size()), out, tol, "pixelfly forward");
  expect_close(to_host(dgx, gx.size()), gx, tol, "pixelfly grad_x");
  expect_close(to_host(dgb, gb.size()), gb, tol, "pixelfly grad_blocks");
  for (void* p : {(void*)dx, (void*)dblocks, (void*)ddout, (void*)dout_, (void*)dgx, (void*)dgb, (void*)doff,
                  (void*)dcols}) {
    CUDA_OK(cudaFree(p));
  }
}

template <typename T>
void monarch_cases(DType dtype) {
  // rows, k, q, p, l, s, r, x_row_stride
  monarch<T>(dtype, {37, 4, 16, 16, 4, 16, 16, 64});
  monarch<T>(dtype, {70, 3, 24, 20, 6, 10, 12, 64});  // rectangular blocks, l * r = k * q, strided x
  monarch<T>(dtype, {45, 4, 3, 5, 2, 6, 6, 21});      // q % l != 0: out1 kept as [t][n_mid]
  monarch<T>(dtype, {300, 4, 64, 64, 4, 64, 64, 256});  // whole 16-byte loads and stores
}

template <typename T>
void pixelfly_cases(DType dtype) {
  pixelfly<T>(dtype, 45, 16, 4, 3, 0);
  pixelfly<T>(dtype, 20, 32, 3, 4, 8);
  pixelfly<T>(dtype, 150, 4, 5, 6, 3);  // three token tiles for each block row and column
}

}  // namespace

int main() {
  require_device("structured_cuda");
  monarch_cases<float>(DType::Float32);
  // The tensor-core GEMM at each tile size, whatever the shape would pick.
  for (const char* tile : {"64", "128"}) {
    setenv("EFFX_CUDA_GEMM_TILE", tile, 1);
    monarch_cases<effx::Half>(DType::Float16);
    monarch_cases<effx::BFloat16>(DType::BFloat16);
  }
  unsetenv("EFFX_CUDA_GEMM_TILE");
  pixelfly_cases<float>(DType::Float32);
  pixelfly_cases<effx::Half>(DType::Float16);
  pixelfly_cases<effx::BFloat16>(DType::BFloat16);
  std::printf("structured_cuda: ok\n");
  return 0;
}
