// effx family: group-wise asymmetric quantization, CPU operator implementations.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "quant_args.h"

namespace effx {
namespace ops {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_cpu(const at::Tensor& x, int64_t bits,
                                                            int64_t group_size) {
  QuantizeCall c = prepare_quantize(x, bits, group_size);
  cpu::quantize(c.shape, c.dtype, c.x.const_data_ptr(), c.codes.data_ptr<int32_t>(),
                c.scale.data_ptr(), c.zero.data_ptr(), at::get_num_threads());
  return {c.codes, c.scale, c.zero};
}

at::Tensor dequantize_cpu(const at::Tensor& codes, const at::Tensor& scale,
                          const at::Tensor& zero, int64_t bits, int64_t group_size,
                          at::ScalarType dtype) {
  DequantizeCall c = prepare_dequantize(codes, scale, zero, bits, group_size, dtype);
  cpu::dequantize(c.shape, c.codes.const_data_ptr<int32_t>(), c.param_dtype,
                  c.scale.const_data_ptr(), c.zero.const_data_ptr(), c.out_dtype,
                  c.out.data_ptr(), at::get_num_threads());
  return c.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(effx, CPU, m) {
  m.impl("quantize", &quantize_cpu);
  m.impl("dequantize", &dequantize_cpu);
}

}  // namespace ops
}  // namespace effx
