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

  // DejaVu contextual sparsity (SPECS.md section 4): gathered up/gate projection with fused
  // bias and activation, and the down projection over the transposed weight [n, d].
  m.def(
      "sparse_mlp_up(Tensor x, Tensor w_up, Tensor idx, str activation=\"relu\", "
      "Tensor? w_gate=None, Tensor? b_up=None, Tensor? b_gate=None, int rows_per_index=1, "
      "bool check_indices=True) -> Tensor");
  m.def(
      "sparse_mlp_down(Tensor h, Tensor w_down_t, Tensor idx, Tensor? b_down=None, "
      "int rows_per_index=1, bool check_indices=True) -> Tensor");
  // Both projections in one call: h = act(x W1[idx]^T + b1[idx]) (gated with w_gate), then
  // y = h W2t[idx] + b2.
  m.def(
      "sparse_mlp(Tensor x, Tensor w_up, Tensor w_down_t, Tensor idx, str activation=\"relu\", "
      "Tensor? w_gate=None, Tensor? b_up=None, Tensor? b_down=None, Tensor? b_gate=None, "
      "bool check_indices=True) -> Tensor");
}
