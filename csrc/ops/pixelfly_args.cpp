// effx family: Pixelated butterfly block-sparse matmul, argument checks and allocation (see
// pixelfly_args.h).
#include "pixelfly_args.h"

#include "checks.h"

namespace effx {
namespace ops {
namespace {

DType block_sparse_dtype(const at::Tensor& t, const char* op, const char* arg) {
  if (t.scalar_type() == at::kDouble) {
    EFFX_CHECK(t.device().is_cpu(), op, arg,
               " must be float32, float16 or bfloat16 on CUDA (float64 is CPU only), got Double");
    return DType::Float64;
  }
  return float_dtype(t, op, arg);
}

void check_index(const at::Tensor& t, const char* arg, const char* op) {
  EFFX_CHECK(t.scalar_type() == at::kLong, op, arg, " must be int64, got ",
             describe(t.scalar_type()));
  EFFX_CHECK(t.dim() == 1, op, arg, " must be 1-D, got shape ", t.sizes());
}

BlockSparseCall prepare_common(const at::Tensor& x, const at::Tensor& blocks,
                               const at::Tensor& row_offsets, const at::Tensor& col_indices,
                               const char* op) {
  EFFX_CHECK(x.dim() >= 1, op, "x must have at least 1 dim, got a 0-dim tensor");
  const DType dtype = block_sparse_dtype(x, op, "x");
  check_same_device(x, "x", blocks, "blocks", op);
  check_same_device(x, "x", row_offsets, "row_offsets", op);
  check_same_device(x, "x", col_indices, "col_indices", op);
  EFFX_CHECK(blocks.scalar_type() == x.scalar_type(), op, "blocks must have the dtype of x (",
             describe(x.scalar_type()), "), got ", describe(blocks.scalar_type()));
  EFFX_CHECK(blocks.dim() == 3 && blocks.size(1) == blocks.size(2), op,
             "blocks must be (nnz, block, block), got shape ", blocks.sizes());
  const int64_t bs = blocks.size(1);
  EFFX_CHECK(bs >= 1 && bs <= kBlockSparseMaxBlock, op, "block size must be in [1, ",
             kBlockSparseMaxBlock, "], got ", bs);
  check_index(row_offsets, "row_offsets", op);
  check_index(col_indices, "col_indices", op);
  EFFX_CHECK(row_offsets.numel() >= 2, op,
             "row_offsets must have R + 1 >= 2 entries, got ", row_offsets.numel());
  const int64_t nnz = blocks.size(0);
  EFFX_CHECK(col_indices.numel() == nnz, op, "col_indices must have one entry per block (", nnz,
             "), got ", col_indices.numel());
  EFFX_CHECK(x.size(-1) % bs == 0 && x.size(-1) > 0, op,
             "x must have a last dim that is a positive multiple of the block size (", bs,
             "), got ", x.size(-1));
  const int64_t col_blocks = x.size(-1) / bs, row_blocks = row_offsets.numel() - 1;

  BlockSparseCall call;
  call.dtype = dtype;
  call.row_offsets = row_offsets.contiguous();
  call.col_indices = col_indices.contiguous();
  if (x.device().is_cpu()) {
    const int64_t* ro = call.row_offsets.const_data_ptr<int64_t>();
    const int64_t* ci = call.col_indices.const_data_ptr<int64_t>();
    EFFX_CHECK(ro[0] == 0 && ro[row_blocks] == nnz, op,
               "row_offsets must run from 0 to the number of blocks (", nnz, "), got ", ro[0],
               " .. ", ro[row_blocks]);
    for (int64_t rb = 0; rb < row_blocks; ++rb)
      EFFX_CHECK(ro[rb] <= ro[rb + 1], op, "row_offsets must be non-decreasing, got ", ro[rb],
                 " then ", ro[rb + 1], " at block-row ", rb);
    for (int64_t e = 0; e < nnz; ++e)
      EFFX_CHECK(ci[e] >= 0 && ci[e] < col_blocks, op, "col_indices must be in [0, ",
                 col_blocks, ") (x has ", col_blocks, " blocks of ", bs, "), got ", ci[e],
                 " at entry ", e);
  }
  int64_t stride = row_stride(x);
  call.x = stride >= 0 ? x : x.contiguous();
  if (stride < 0) stride = x.size(-1);
  call.blocks = blocks.contiguous();
  call.shape = BlockSparseShape{x.numel() / x.size(-1), bs, row_blocks, col_blocks, nnz, stride};
  return call;
}

}  // namespace

BlockSparseCall prepare_block_sparse_forward(const at::Tensor& x, const at::Tensor& blocks,
                                             const at::Tensor& row_offsets,
                                             const at::Tensor& col_indices) {
  BlockSparseCall call = prepare_common(x, blocks, row_offsets, col_indices, "block_sparse_matmul");
  auto out_shape = x.sizes().vec();
  out_shape.back() = call.shape.out_features();
  call.out = at::empty(out_shape, x.options());
  return call;
}

BlockSparseCall prepare_block_sparse_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                              const at::Tensor& blocks,
                                              const at::Tensor& row_offsets,
                                              const at::Tensor& col_indices) {
  constexpr const char* op = "block_sparse_matmul_backward";
  BlockSparseCall call = prepare_common(x, blocks, row_offsets, col_indices, op);
  check_same_device(x, "x", grad_out, "grad_out", op);
  EFFX_CHECK(grad_out.scalar_type() == x.scalar_type(), op, "grad_out must have the dtype of x (",
             describe(x.scalar_type()), "), got ", describe(grad_out.scalar_type()));
  auto expected = x.sizes().vec();
  expected.back() = call.shape.out_features();
  EFFX_CHECK(grad_out.sizes() == at::IntArrayRef(expected), op, "grad_out must have shape ",
             at::IntArrayRef(expected), ", got ", grad_out.sizes());
  call.grad = grad_out.contiguous();
  call.out = at::empty(x.sizes(), x.options());
  call.grad_blocks = at::empty(blocks.sizes(), blocks.options());
  return call;
}

}  // namespace ops
}  // namespace effx
