// effx family: Pixelated butterfly block-sparse matmul, CPU operator implementations.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "pixelfly_args.h"

namespace effx {
namespace ops {
namespace {

at::Tensor block_sparse_matmul_cpu(const at::Tensor& x, const at::Tensor& blocks,
                                   const at::Tensor& row_offsets, const at::Tensor& col_indices) {
  BlockSparseCall c = prepare_block_sparse_forward(x, blocks, row_offsets, col_indices);
  cpu::block_sparse_forward(c.shape, c.dtype, c.x.const_data_ptr(), c.blocks.const_data_ptr(),
                            c.row_offsets.const_data_ptr<int64_t>(),
                            c.col_indices.const_data_ptr<int64_t>(), c.out.data_ptr(),
                            at::get_num_threads());
  return c.out;
}

std::tuple<at::Tensor, at::Tensor> block_sparse_matmul_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& blocks,
    const at::Tensor& row_offsets, const at::Tensor& col_indices) {
  BlockSparseCall c = prepare_block_sparse_backward(grad_out, x, blocks, row_offsets, col_indices);
  cpu::block_sparse_backward(c.shape, c.dtype, c.grad.const_data_ptr(), c.x.const_data_ptr(),
                             c.blocks.const_data_ptr(), c.row_offsets.const_data_ptr<int64_t>(),
                             c.col_indices.const_data_ptr<int64_t>(), c.out.data_ptr(),
                             c.grad_blocks.data_ptr(), at::get_num_threads());
  return {c.out, c.grad_blocks};
}

}  // namespace

TORCH_LIBRARY_IMPL(effx, CPU, m) {
  m.impl("block_sparse_matmul", &block_sparse_matmul_cpu);
  m.impl("block_sparse_matmul_backward", &block_sparse_matmul_backward_cpu);
}

}  // namespace ops
}  // namespace effx
