// effx: every operator schema in one place. Implementations register per backend in
// csrc/ops/<family>.cpp (CPU) and csrc/ops/cuda/<family>.cpp (CUDA); fake kernels for
// torch.compile live in python/effx/_meta.py, which torch imports on first use.
#include <torch/library.h>

TORCH_LIBRARY(effx, m) {
  m.set_python_module("effx._meta");

  // Group-wise asymmetric quantization (SPECS.md section 1).
  m.def("quantize(Tensor x, int bits, int group_size) -> (Tensor codes, Tensor scale, Tensor zero)");
  m.def(
      "dequantize(Tensor codes, Tensor scale, Tensor zero, int bits, int group_size, "
      "ScalarType dtype) -> Tensor");

  // Monarch structured matrices (SPECS.md section 6): x [..., k*p], w1 (k, q, p), w2 (l, s, r).
  m.def("monarch_matmul(Tensor x, Tensor w1, Tensor w2) -> Tensor");
  m.def(
      "monarch_matmul_backward(Tensor grad_out, Tensor x, Tensor w1, Tensor w2) -> "
      "(Tensor grad_x, Tensor grad_w1, Tensor grad_w2)");

  // Pixelated butterfly (SPECS.md section 6): block-CSR matmul, x [..., C*block],
  // blocks (nnz, block, block), row_offsets [R + 1], col_indices [nnz] (int64).
  m.def("block_sparse_matmul(Tensor x, Tensor blocks, Tensor row_offsets, Tensor col_indices) -> Tensor");
  m.def(
      "block_sparse_matmul_backward(Tensor grad_out, Tensor x, Tensor blocks, Tensor row_offsets, "
      "Tensor col_indices) -> (Tensor grad_x, Tensor grad_blocks)");
}
