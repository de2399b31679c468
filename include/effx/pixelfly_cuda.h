// effx family: Pixelated butterfly block-sparse matmul, CUDA entry points (layout in
// pixelfly.h; dtype Float32, Float16 or BFloat16; indices on the device). Kernels are
// enqueued on `stream`; launch errors come back as the result.
#pragma once

#include <cuda_runtime_api.h>

#include "effx/pixelfly.h"

namespace effx {
namespace cuda {

cudaError_t block_sparse_forward(const BlockSparseShape& s, DType dtype, const void* x,
                                 const void* blocks, const int64_t* row_offsets,
                                 const int64_t* col_indices, void* out, cudaStream_t stream);

cudaError_t block_sparse_backward(const BlockSparseShape& s, DType dtype, const void* grad_out,
                                  const void* x, const void* blocks, const int64_t* row_offsets,
                                  const int64_t* col_indices, void* grad_x, void* grad_blocks,
                                  cudaStream_t stream);

}  // namespace cuda
}  // namespace effx
