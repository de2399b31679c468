// effx family: Pixelated butterfly (SPECS.md section 6), the block-sparse matmul, torch-free.
//
// Layout: the weight is an R x C grid of square blocks of `block` values, of which the nnz
// present ones are stored row by row (block-CSR, like torch's sparse_bsr): blocks is
// (nnz, block, block) row-major, the blocks of block-row rb are entries
// row_offsets[rb] .. row_offsets[rb + 1] - 1 and entry e sits in block-column col_indices[e].
// x is `rows` rows of C * block values (contiguous last dim, row stride x_row_stride); out
// is rows x R * block, contiguous:
//   out[t, rb*block + a] = sum_{e in row rb} sum_b blocks[e, a, b] * x[t, col[e]*block + b].
// Indices are int64; row_offsets must be non-decreasing from 0 to nnz and every col index in
// [0, C). The operator layer checks this on CPU; on CUDA (where that check would cost a
// device sync) the kernels clamp entries to [0, nnz) and skip columns outside [0, C).
#pragma once

#include <cstdint>

#include "effx/dtype.h"

namespace effx {

struct BlockSparseShape {
  int64_t rows;          // independent rows (tokens)
  int64_t block;         // block size (1..64)
  int64_t row_blocks;    // R
  int64_t col_blocks;    // C
  int64_t nnz;           // stored blocks
  int64_t x_row_stride;  // elements between consecutive rows of x

  int64_t in_features() const { return col_blocks * block; }
  int64_t out_features() const { return row_blocks * block; }
};

constexpr int64_t kBlockSparseMaxBlock = 64;

namespace cpu {

// dtype: Float32, Float16, BFloat16 or Float64 (for gradcheck); fp32 (fp64) accumulation.
void block_sparse_forward(const BlockSparseShape& s, DType dtype, const void* x,
                          const void* blocks, const int64_t* row_offsets,
                          const int64_t* col_indices, void* out, int num_threads);

// grad_out: rows x R*block contiguous. grad_x: rows x C*block contiguous; grad_blocks like blocks.
void block_sparse_backward(const BlockSparseShape& s, DType dtype, const void* grad_out,
                           const void* x, const void* blocks, const int64_t* row_offsets,
                           const int64_t* col_indices, void* grad_x, void* grad_blocks,
                           int num_threads);

}  // namespace cpu
}  // namespace effx
