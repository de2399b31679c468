// effx family: Pixelated butterfly block-sparse matmul, CUDA operator implementations (host
// C++; the kernels are in csrc/kernels/cuda/pixelfly.cu).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../pixelfly_args.h"
#include "effx/pixelfly_cuda.h"

namespace effx {
namespace ops {
namespace {

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "effx.", op, ": CUDA kernel failed: ", cudaGetErrorString(err));
}

at::Tensor block_sparse_matmul_cuda(const at::Tensor& x, const at::Tensor& blocks,
                                    const at::Tensor& row_offsets, const at::Tensor& col_indices) {
  const c10::cuda::CUDAGuard guard(x.device());
  BlockSparseCall c = prepare_block_sparse_forward(x, blocks, row_offsets, col_indices);
  check_launch(cuda::block_sparse_forward(c.shape, c.dtype, c.x.const_data_ptr(),
                                          c.blocks.const_data_ptr(),
                                          c.row_offsets.const_data_ptr<int64_t>(),
                                          c.col_indices.const_data_ptr<int64_t>(),
                                          c.out.data_ptr(), at::cuda::getCurrentCUDAStream()),
               "block_sparse_matmul");
  return c.out;
}

std::tuple<at::Tensor, at::Tensor> block_sparse_matmul_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& blocks,
    const at::Tensor& row_offsets, const at::Tensor& col_indices) {
  const c10::cuda::CUDAGuard guard(x.device());
  BlockSparseCall c = prepare_block_sparse_backward(grad_out, x, blocks, row_offsets, col_indices);
  check_launch(cuda::block_sparse_backward(c.shape, c.dtype, c.grad.const_data_ptr(),
                                           c.x.const_data_ptr(), c.blocks.const_data_ptr(),
                                           c.row_offsets.const_data_ptr<int64_t>(),
                                           c.col_indices.const_data_ptr<int64_t>(),
                                           c.out.data_ptr(), c.grad_blocks.data_ptr(),
                                           at::cuda::getCurrentCUDAStream()),
               "block_sparse_matmul_backward");
  return {c.out, c.grad_blocks};
}

}  // namespace

TORCH_LIBRARY_IMPL(effx, CUDA, m) {
  m.impl("block_sparse_matmul", &block_sparse_matmul_cuda);
  m.impl("block_sparse_matmul_backward", &block_sparse_matmul_backward_cuda);
}

}  // namespace ops
}  // namespace effx
