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
}
