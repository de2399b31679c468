// effx family: Pixelated butterfly block-sparse matmul. Argument checks and output allocation
// shared by the CPU and CUDA implementations (float64 and the index value checks are CPU only).
#pragma once

#include <ATen/ATen.h>

#include "effx/pixelfly.h"

namespace effx {
namespace ops {

struct BlockSparseCall {
  BlockSparseShape shape;
  DType dtype;
  at::Tensor x;  // x itself, or a contiguous copy when its strides have no row view
  at::Tensor blocks, row_offsets, col_indices;  // contiguous
  at::Tensor grad;                              // backward only: contiguous [rows, R*block]
  at::Tensor out;                               // forward: [..., R*block]; backward: grad_x
  at::Tensor grad_blocks;
};

BlockSparseCall prepare_block_sparse_forward(const at::Tensor& x, const at::Tensor& blocks,
                                             const at::Tensor& row_offsets,
                                             const at::Tensor& col_indices);

BlockSparseCall prepare_block_sparse_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                              const at::Tensor& blocks,
                                              const at::Tensor& row_offsets,
                                              const at::Tensor& col_indices);

}  // namespace ops
}  // namespace effx
