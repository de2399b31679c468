// effx family: DejaVu contextual sparsity, CUDA operator implementations (host C++; the kernels
// are in csrc/kernels/cuda/sparse.cu).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../sparse_args.h"
#include "effx/sparse_cuda.h"

namespace effx {
namespace ops {
namespace {

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "effx.", op, ": CUDA kernel failed: ", cudaGetErrorString(err));
}

void run_up(const SparseUpCall& c, const char* op) {
  check_launch(cuda::sparse_mlp_up(c.shape, c.dtype, c.act, c.x.const_data_ptr(),
                                   c.w_up.const_data_ptr(), maybe_data(c.w_gate),
                                   maybe_data(c.b_up), maybe_data(c.b_gate),
                                   c.idx.const_data_ptr<int64_t>(), c.h.data_ptr(),
                                   at::cuda::getCurrentCUDAStream()),
               op);
}

void run_down(const SparseDownCall& c, const char* op) {
  const int64_t floats = cuda::sparse_mlp_down_workspace(c.shape, c.dtype);
  at::Tensor ws;
  if (floats > 0) ws = at::empty({floats}, c.y.options().dtype(at::kFloat));
  check_launch(cuda::sparse_mlp_down(c.shape, c.dtype, c.h.const_data_ptr(),
                                     c.w_down_t.const_data_ptr(), maybe_data(c.b_down),
                                     c.idx.const_data_ptr<int64_t>(),
                                     floats > 0 ? ws.data_ptr<float>() : nullptr, c.y.data_ptr(),
                                     at::cuda::getCurrentCUDAStream()),
               op);
}

at::Tensor sparse_mlp_up_cuda(const at::Tensor& x, const at::Tensor& w_up, const at::Tensor& idx,
                              const std::string& activation,
                              const std::optional<at::Tensor>& w_gate,
                              const std::optional<at::Tensor>& b_up,
                              const std::optional<at::Tensor>& b_gate, int64_t rows_per_index,
                              bool check_indices) {
  const c10::cuda::CUDAGuard guard(x.device());
  SparseUpCall c = prepare_sparse_up(x, w_up, idx, activation, w_gate, b_up, b_gate,
                                     rows_per_index, check_indices);
  run_up(c, "sparse_mlp_up");
  return c.h;
}

at::Tensor sparse_mlp_down_cuda(const at::Tensor& h, const at::Tensor& w_down_t,
                                const at::Tensor& idx, const std::optional<at::Tensor>& b_down,
                                int64_t rows_per_index, bool check_indices) {
  const c10::cuda::CUDAGuard guard(h.device());
  SparseDownCall c = prepare_sparse_down(h, w_down_t, idx, b_down, rows_per_index, check_indices);
  run_down(c, "sparse_mlp_down");
  return c.y;
}

at::Tensor sparse_mlp_cuda(const at::Tensor& x, const at::Tensor& w_up, const at::Tensor& w_down_t,
                           const at::Tensor& idx, const std::string& activation,
                           const std::optional<at::Tensor>& w_gate,
                           const std::optional<at::Tensor>& b_up,
                           const std::optional<at::Tensor>& b_down,
                           const std::optional<at::Tensor>& b_gate, bool check_indices) {
  const c10::cuda::CUDAGuard guard(x.device());
  SparseMlpCall c = prepare_sparse_mlp(x, w_up, w_down_t, idx, activation, w_gate, b_up, b_down,
                                       b_gate, check_indices);
  run_up(c.up, "sparse_mlp");
  run_down(c.down, "sparse_mlp");
  return c.down.y;
}

}  // namespace

TORCH_LIBRARY_IMPL(effx, CUDA, m) {
  m.impl("sparse_mlp_up", &sparse_mlp_up_cuda);
  m.impl("sparse_mlp_down", &sparse_mlp_down_cuda);
  m.impl("sparse_mlp", &sparse_mlp_cuda);
}

}  // namespace ops
}  // namespace effx
